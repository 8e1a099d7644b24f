/* exec's parameters to a `struct exec_spec` (docs/agent-protocol.md, "exec"); container and join fields
 * follow the OCI runtime spec's config.json ("process", "mounts", "linux.namespaces"). */
#define _GNU_SOURCE
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <unistd.h>

#include "agent.h"

#define DEFAULT_WINDOW (256u << 10)
#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static const struct {
	const char *name;
	int resource;
} rlimit_names[] = {
	{"AS", RLIMIT_AS},         {"CORE", RLIMIT_CORE},         {"CPU", RLIMIT_CPU},
	{"DATA", RLIMIT_DATA},     {"FSIZE", RLIMIT_FSIZE},       {"LOCKS", RLIMIT_LOCKS},
	{"MEMLOCK", RLIMIT_MEMLOCK}, {"MSGQUEUE", RLIMIT_MSGQUEUE}, {"NICE", RLIMIT_NICE},
	{"NOFILE", RLIMIT_NOFILE}, {"NPROC", RLIMIT_NPROC},       {"RSS", RLIMIT_RSS},
	{"RTPRIO", RLIMIT_RTPRIO}, {"RTTIME", RLIMIT_RTTIME},     {"SIGPENDING", RLIMIT_SIGPENDING},
	{"STACK", RLIMIT_STACK},
};

/* mount(8) option words as runc maps them to mount(2) flags; `clear` words undo a flag. */
static const struct {
	const char *name;
	unsigned long flag;
	bool clear;
} mount_flags[] = {
	{"ro", MS_RDONLY, false},         {"rw", MS_RDONLY, true},         {"nosuid", MS_NOSUID, false},
	{"suid", MS_NOSUID, true},        {"nodev", MS_NODEV, false},      {"dev", MS_NODEV, true},
	{"noexec", MS_NOEXEC, false},     {"exec", MS_NOEXEC, true},       {"sync", MS_SYNCHRONOUS, false},
	{"async", MS_SYNCHRONOUS, true},  {"dirsync", MS_DIRSYNC, false},  {"remount", MS_REMOUNT, false},
	{"mand", MS_MANDLOCK, false},     {"nomand", MS_MANDLOCK, true},   {"atime", MS_NOATIME, true},
	{"noatime", MS_NOATIME, false},   {"diratime", MS_NODIRATIME, true}, {"nodiratime", MS_NODIRATIME, false},
	{"relatime", MS_RELATIME, false}, {"norelatime", MS_RELATIME, true}, {"strictatime", MS_STRICTATIME, false},
	{"nostrictatime", MS_STRICTATIME, true}, {"bind", MS_BIND, false}, {"rbind", MS_BIND | MS_REC, false},
	{"silent", MS_SILENT, false},
};

static const struct {
	const char *name;
	unsigned long flags;
} propagations[] = {
	{"private", MS_PRIVATE},       {"rprivate", MS_PRIVATE | MS_REC}, {"shared", MS_SHARED},
	{"rshared", MS_SHARED | MS_REC}, {"slave", MS_SLAVE},             {"rslave", MS_SLAVE | MS_REC},
	{"unbindable", MS_UNBINDABLE}, {"runbindable", MS_UNBINDABLE | MS_REC},
};

static const struct {
	const char *name;
	int flag;
} namespaces[] = {
	{"mount", CLONE_NEWNS}, {"mnt", CLONE_NEWNS}, {"uts", CLONE_NEWUTS}, {"ipc", CLONE_NEWIPC},
	{"pid", CLONE_NEWPID},  {"net", CLONE_NEWNET}, {"network", CLONE_NEWNET},
};

__attribute__((format(printf, 2, 3))) static bool bad(struct request *r, const char *fmt, ...)
{
	char text[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(text, sizeof text, fmt, ap);
	va_end(ap);
	reply_error(r, E_INVALID_PARAMS, "exec: %s", text);
	return false;
}

static bool uint_of(const struct mp_value *v, uint64_t *out)
{
	if (v == NULL || v->type != MP_INT || (!v->is_unsigned && v->v.i < 0))
		return false;
	*out = v->is_unsigned ? v->v.u : (uint64_t)v->v.i;
	return true;
}

static bool parse_rlimits(struct request *r, const struct mp_value *v, struct exec_spec *s)
{
	if (v->type != MP_ARRAY)
		return bad(r, "rlimits must be an array of {type, soft, hard}");
	s->rlimits = calloc(v->len + 1, sizeof *s->rlimits);
	if (s->rlimits == NULL)
		abort();
	for (uint32_t i = 0; i < v->len; i++) {
		const struct mp_value *e = &v->v.items[i], *type = mp_map_get(e, "type");
		uint64_t soft, hard;
		if (type == NULL || type->type != MP_STR || !uint_of(mp_map_get(e, "soft"), &soft) ||
		    !uint_of(mp_map_get(e, "hard"), &hard))
			return bad(r, "rlimits must be an array of {type, soft, hard}");
		const char *name = (const char *)type->v.bytes;
		size_t n = type->len;
		if (n > 7 && memcmp(name, "RLIMIT_", 7) == 0)
			name += 7, n -= 7;
		size_t k = 0;
		for (; k < sizeof rlimit_names / sizeof rlimit_names[0]; k++)
			if (strlen(rlimit_names[k].name) == n && strncasecmp(rlimit_names[k].name, name, n) == 0)
				break;
		if (k == sizeof rlimit_names / sizeof rlimit_names[0])
			return bad(r, "rlimits: unknown type (RLIMIT_NOFILE, RLIMIT_NPROC, ...)");
		if (soft > hard)
			return bad(r, "rlimits: %s soft limit is above its hard limit", rlimit_names[k].name);
		s->rlimits[s->nrlimits].resource = rlimit_names[k].resource;
		s->rlimits[s->nrlimits].lim = (struct rlimit){.rlim_cur = soft, .rlim_max = hard};
		s->nrlimits++;
	}
	return true;
}

static bool parse_groups(struct request *r, const struct mp_value *v, struct exec_spec *s)
{
	if (v->type != MP_ARRAY || v->len > 65536)
		return bad(r, "groups must be an array of up to 65536 group ids");
	s->groups = calloc(v->len + 1, sizeof *s->groups);
	if (s->groups == NULL)
		abort();
	for (uint32_t i = 0; i < v->len; i++) {
		uint64_t g;
		if (!uint_of(&v->v.items[i], &g) || g > 0xfffffffe)
			return bad(r, "groups must be an array of group ids");
		s->groups[s->ngroups++] = (gid_t)g;
	}
	return true;
}

/* A mount's "options": flag words become mount(2) flags, propagation words a second call, and anything
 * else (mode=755, size=64m, newinstance, ...) the filesystem's data string. */
static bool parse_mount_options(struct request *r, const struct mp_value *v, struct mountspec *m, struct buf *data)
{
	if (v == NULL || v->type == MP_NIL)
		return true;
	if (v->type != MP_ARRAY)
		return bad(r, "container.mounts: options must be an array of strings");
	for (uint32_t i = 0; i < v->len; i++) {
		char *word;
		bool known = false;
		if (!p_cstr(r, &v->v.items[i], "container.mounts options", &word))
			return false;
		for (size_t k = 0; k < sizeof mount_flags / sizeof mount_flags[0] && !known; k++)
			if (strcmp(word, mount_flags[k].name) == 0) {
				known = true;
				if (mount_flags[k].clear)
					m->flags &= ~mount_flags[k].flag;
				else
					m->flags |= mount_flags[k].flag;
			}
		for (size_t k = 0; k < sizeof propagations / sizeof propagations[0] && !known; k++)
			if (strcmp(word, propagations[k].name) == 0) {
				known = true;
				m->propagation = propagations[k].flags;
			}
		if (!known) {
			if (data->len)
				buf_append(data, ",", 1);
			buf_append(data, word, strlen(word));
		}
		free(word);
	}
	return true;
}

/* A ".." component could lead a mount target out of the container's root. */
static bool has_dotdot(const char *path)
{
	for (const char *p = path; (p = strstr(p, "..")) != NULL; p += 2)
		if ((p == path || p[-1] == '/') && (p[2] == 0 || p[2] == '/'))
			return true;
	return false;
}

static bool parse_mounts(struct request *r, const struct mp_value *v, struct exec_spec *s)
{
	if (v->type != MP_ARRAY)
		return bad(r, "container.mounts must be an array of maps");
	s->mounts = calloc(v->len + 1, sizeof *s->mounts);
	if (s->mounts == NULL)
		abort();
	for (uint32_t i = 0; i < v->len; i++) {
		const struct mp_value *e = &v->v.items[i], *x;
		struct mountspec *m = &s->mounts[s->nmounts++];
		struct buf data = {0};
		if (e->type != MP_MAP)
			return bad(r, "container.mounts must be an array of maps");
		if (!p_cstr(r, mp_map_get(e, "target"), "container.mounts target", &m->target))
			return false;
		if (m->target[0] != '/' || has_dotdot(m->target))
			return bad(r, "container.mounts: target %s must be an absolute path without '..'", m->target);
		if ((x = mp_map_get(e, "type")) && x->type != MP_NIL && !p_cstr(r, x, "container.mounts type", &m->type))
			return false;
		if ((x = mp_map_get(e, "source")) && x->type != MP_NIL && !p_cstr(r, x, "container.mounts source", &m->source))
			return false;
		if (!parse_mount_options(r, mp_map_get(e, "options"), m, &data)) {
			buf_free(&data);
			return false;
		}
		if ((x = mp_map_get(e, "data")) && x->type != MP_NIL) {
			char *extra;
			if (!p_cstr(r, x, "container.mounts data", &extra)) {
				buf_free(&data);
				return false;
			}
			if (data.len && *extra)
				buf_append(&data, ",", 1);
			buf_append(&data, extra, strlen(extra));
			free(extra);
		}
		if (data.len) {
			buf_append(&data, "", 1);
			m->data = (char *)data.data;
		}
		if (m->type == NULL && !(m->flags & MS_BIND))
			return bad(r, "container.mounts: %s needs a type (or the bind option)", m->target);
		if (m->source == NULL && (m->flags & MS_BIND))
			return bad(r, "container.mounts: bind mount %s needs a source", m->target);
	}
	return true;
}

static bool parse_container(struct request *r, const struct mp_value *c, struct exec_spec *s)
{
	const struct mp_value *v;
	if (c->type != MP_MAP)
		return bad(r, "container must be a map");
	for (uint32_t i = 0; i < c->len; i++) {
		const struct mp_value *k = &c->v.items[2 * i];
		if (!mp_str_is(k, "rootfs") && !mp_str_is(k, "mounts") && !mp_str_is(k, "hostname") &&
		    !mp_str_is(k, "namespaces") && !mp_str_is(k, "readonly_root"))
			return bad(r, "container: unknown field (rootfs, mounts, hostname, namespaces, readonly_root)");
	}
	if (!p_cstr(r, mp_map_get(c, "rootfs"), "container.rootfs", &s->rootfs))
		return false;
	if (s->rootfs[0] != '/')
		return bad(r, "container.rootfs %s must be an absolute path", s->rootfs);
	s->nsflags = CLONE_NEWNS;
	if ((v = mp_map_get(c, "namespaces")) != NULL) {
		if (v->type != MP_ARRAY)
			return bad(r, "container.namespaces must be an array of names");
		for (uint32_t i = 0; i < v->len; i++) {
			size_t k = 0;
			for (; k < sizeof namespaces / sizeof namespaces[0]; k++)
				if (mp_str_is(&v->v.items[i], namespaces[k].name))
					break;
			if (k == sizeof namespaces / sizeof namespaces[0])
				return bad(r, "container.namespaces: only mount, uts, ipc, pid and net are supported");
			s->nsflags |= namespaces[k].flag;
		}
	}
	if ((v = mp_map_get(c, "hostname")) != NULL && v->type != MP_NIL) {
		if (!p_cstr(r, v, "container.hostname", &s->hostname))
			return false;
		if (!(s->nsflags & CLONE_NEWUTS))
			return bad(r, "container.hostname needs the uts namespace");
	}
	if ((v = mp_map_get(c, "readonly_root")) != NULL && v->type != MP_NIL) {
		if (v->type != MP_BOOL)
			return bad(r, "container.readonly_root must be true or false");
		s->readonly_root = v->v.b;
	}
	if ((v = mp_map_get(c, "mounts")) != NULL && v->type != MP_NIL && !parse_mounts(r, v, s))
		return false;
	return true;
}

static bool default_env(struct exec_spec *s)
{
	s->env = calloc(4, sizeof *s->env);
	if (s->env == NULL)
		abort();
	s->env[0] = strdup(DEFAULT_PATH);
	s->env[1] = strdup(s->uid == 0 ? "HOME=/root" : "HOME=/");
	if (s->tty)
		s->env[2] = strdup("TERM=xterm");
	return true;
}

bool spec_parse(struct request *r, struct exec_spec *s)
{
	int64_t n;
	const struct mp_value *v;
	memset(s, 0, sizeof *s);
	s->umask = 022;
	s->rows = 24, s->cols = 80;
	s->window = DEFAULT_WINDOW;
	if (!p_strv(r, mp_map_get(r->params, "argv"), "argv", &s->argv))
		return false;
	if (s->argv[0] == NULL || s->argv[0][0] == 0)
		return bad(r, "argv must name a program");
	if ((v = mp_map_get(r->params, "env")) != NULL && v->type != MP_NIL) {
		if (!p_strv(r, v, "env", &s->env))
			return false;
		for (char **e = s->env; *e; e++)
			if (strchr(*e, '=') == NULL || **e == '=')
				return bad(r, "env entry '%s' is not NAME=VALUE", *e);
	}
	if (!p_string(r, "cwd", &s->cwd, false))
		return false;
	n = geteuid(); /* by default the agent's own: root in a guest */
	if (!p_int(r, "uid", &n, 0, 0xfffffffe, false))
		return false;
	s->uid = (uid_t)n;
	n = getegid();
	if (!p_int(r, "gid", &n, 0, 0xfffffffe, false))
		return false;
	s->gid = (gid_t)n;
	if ((v = mp_map_get(r->params, "groups")) != NULL && v->type != MP_NIL && !parse_groups(r, v, s))
		return false;
	n = 022;
	if (!p_int(r, "umask", &n, 0, 0777, false))
		return false;
	s->umask = (mode_t)n;
	if ((v = mp_map_get(r->params, "rlimits")) != NULL && v->type != MP_NIL && !parse_rlimits(r, v, s))
		return false;
	if (!p_bool(r, "tty", &s->tty) || !p_bool(r, "stdin", &s->stdin) || !p_bool(r, "detach", &s->detach))
		return false;
	n = 24;
	if (!p_int(r, "rows", &n, 1, 0xffff, false))
		return false;
	s->rows = (uint16_t)n;
	n = 80;
	if (!p_int(r, "cols", &n, 1, 0xffff, false))
		return false;
	s->cols = (uint16_t)n;
	n = DEFAULT_WINDOW;
	if (!p_int(r, "window", &n, 1, 1 << 30, false))
		return false;
	s->window = (uint64_t)n;
	if ((v = mp_map_get(r->params, "container")) != NULL && v->type != MP_NIL && !parse_container(r, v, s))
		return false;
	n = 0;
	if (!p_int(r, "join", &n, 1, 0x7fffffff, false))
		return false;
	s->join = (pid_t)n;
	if (s->join && s->rootfs)
		return bad(r, "container and join exclude each other");
	if (s->env == NULL)
		default_env(s);
	return true;
}

void spec_free(struct exec_spec *s)
{
	strv_free(s->argv);
	strv_free(s->env);
	free(s->cwd);
	free(s->groups);
	free(s->rlimits);
	free(s->rootfs);
	free(s->hostname);
	for (size_t i = 0; i < s->nmounts; i++) {
		free(s->mounts[i].type);
		free(s->mounts[i].source);
		free(s->mounts[i].target);
		free(s->mounts[i].data);
	}
	free(s->mounts);
	memset(s, 0, sizeof *s);
}
