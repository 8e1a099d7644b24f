/* Typed request parameters.  Each getter answers the request with INVALID_PARAMS, naming the method and
 * the parameter, and returns false when the value is missing (and required), of the wrong type or out of
 * range; the handler then just returns. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "agent.h"

static bool bad(struct request *r, const char *key, const char *why)
{
	reply_error(r, E_INVALID_PARAMS, "%s: %s %s", r->method, key, why);
	return false;
}

bool p_int(struct request *r, const char *key, int64_t *out, int64_t min, int64_t max, bool required)
{
	const struct mp_value *v = mp_map_get(r->params, key);
	if (v == NULL || v->type == MP_NIL)
		return required ? bad(r, key, "is required") : true;
	if (v->type != MP_INT)
		return bad(r, key, "must be an integer");
	if (v->is_unsigned || v->v.i < min || v->v.i > max) {
		reply_error(r, E_INVALID_PARAMS, "%s: %s must be from %lld to %lld", r->method, key, (long long)min, (long long)max);
		return false;
	}
	*out = v->v.i;
	return true;
}

bool p_bool(struct request *r, const char *key, bool *out)
{
	const struct mp_value *v = mp_map_get(r->params, key);
	if (v == NULL || v->type == MP_NIL)
		return true;
	if (v->type != MP_BOOL)
		return bad(r, key, "must be true or false");
	*out = v->v.b;
	return true;
}

/* A str (or bin: Linux paths are bytes) as a NUL-terminated copy; a NUL inside is refused. */
bool p_cstr(struct request *r, const struct mp_value *v, const char *what, char **out)
{
	if (v == NULL || (v->type != MP_STR && v->type != MP_BIN))
		return bad(r, what, "must be a string");
	if (memchr(v->v.bytes, 0, v->len) != NULL)
		return bad(r, what, "holds a NUL byte");
	*out = strndup((const char *)v->v.bytes, v->len);
	if (*out == NULL)
		abort();
	return true;
}

bool p_string(struct request *r, const char *key, char **out, bool required)
{
	const struct mp_value *v = mp_map_get(r->params, key);
	*out = NULL;
	if (v == NULL || v->type == MP_NIL)
		return required ? bad(r, key, "is required") : true;
	if (!p_cstr(r, v, key, out))
		return false;
	if (**out == 0) {
		free(*out);
		*out = NULL;
		return bad(r, key, "is empty");
	}
	return true;
}

bool p_bin(struct request *r, const char *key, const uint8_t **data, size_t *len, bool required)
{
	const struct mp_value *v = mp_map_get(r->params, key);
	if (v == NULL || v->type == MP_NIL) {
		*data = NULL;
		*len = 0;
		return required ? bad(r, key, "is required") : true;
	}
	if (v->type != MP_BIN && v->type != MP_STR)
		return bad(r, key, "must be binary");
	*data = v->v.bytes;
	*len = v->len;
	return true;
}

void strv_free(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

/* An array of strings as a NULL-terminated vector (argv, env). */
bool p_strv(struct request *r, const struct mp_value *v, const char *what, char ***out)
{
	*out = NULL;
	if (v == NULL || v->type != MP_ARRAY)
		return bad(r, what, "must be an array of strings");
	char **vec = calloc(v->len + 1, sizeof *vec);
	if (vec == NULL)
		abort();
	for (uint32_t i = 0; i < v->len; i++) {
		if (!p_cstr(r, &v->v.items[i], what, &vec[i])) {
			strv_free(vec);
			return false;
		}
	}
	*out = vec;
	return true;
}

static const struct {
	const char *name;
	int number;
} signals[] = {
	{"HUP", SIGHUP},   {"INT", SIGINT},     {"QUIT", SIGQUIT}, {"ILL", SIGILL},   {"TRAP", SIGTRAP},
	{"ABRT", SIGABRT}, {"BUS", SIGBUS},     {"FPE", SIGFPE},   {"KILL", SIGKILL}, {"USR1", SIGUSR1},
	{"SEGV", SIGSEGV}, {"USR2", SIGUSR2},   {"PIPE", SIGPIPE}, {"ALRM", SIGALRM}, {"TERM", SIGTERM},
	{"CHLD", SIGCHLD}, {"CONT", SIGCONT},   {"STOP", SIGSTOP}, {"TSTP", SIGTSTP}, {"TTIN", SIGTTIN},
	{"TTOU", SIGTTOU}, {"URG", SIGURG},     {"XCPU", SIGXCPU}, {"XFSZ", SIGXFSZ}, {"VTALRM", SIGVTALRM},
	{"PROF", SIGPROF}, {"WINCH", SIGWINCH}, {"IO", SIGIO},     {"PWR", SIGPWR},   {"SYS", SIGSYS},
};

/* A signal by number (1..64) or name ("TERM", "SIGTERM"). */
bool p_signal(struct request *r, const char *key, int *out)
{
	const struct mp_value *v = mp_map_get(r->params, key);
	if (v == NULL)
		return bad(r, key, "is required");
	if (v->type == MP_INT) {
		if (v->is_unsigned || v->v.i < 1 || v->v.i > 64)
			return bad(r, key, "must be a signal number from 1 to 64");
		*out = (int)v->v.i;
		return true;
	}
	if (v->type == MP_STR) {
		const char *s = (const char *)v->v.bytes;
		size_t n = v->len;
		if (n > 3 && memcmp(s, "SIG", 3) == 0)
			s += 3, n -= 3;
		for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
			if (strlen(signals[i].name) == n && memcmp(signals[i].name, s, n) == 0) {
				*out = signals[i].number;
				return true;
			}
	}
	return bad(r, key, "is not a signal (a number, or a name such as TERM)");
}
