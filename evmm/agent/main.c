/* evmm-agent's main loop: listen on vsock (or a Unix socket, for host tests), read frames from clients,
 * dispatch requests, write answers and events back with per-client backpressure.
 *
 * Frames are evmm's RPC frames (evmm/rpc/protocol.py): a 4-byte big-endian length, then one msgpack map.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#include "agent.h"

struct agent A;

static struct watch listen_watch = {.kind = W_LISTEN, .fd = -1};
static struct watch signal_watch = {.kind = W_SIGNAL, .fd = -1};
static struct client *dead_clients;

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Registers, changes or (events 0) removes a watch.  Removing rather than masking matters: epoll reports
 * EPOLLHUP and EPOLLERR even when not asked, so a stream waiting for credit must leave the set. */
void watch_set(struct watch *w, uint32_t events)
{
	if (w->fd < 0 || w->events == events)
		return;
	struct epoll_event ev = {.events = events, .data.ptr = w};
	int op = events == 0 ? EPOLL_CTL_DEL : w->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
	if (epoll_ctl(A.epfd, op, w->fd, &ev) < 0 && op != EPOLL_CTL_DEL) {
		fprintf(stderr, "evmm-agent: epoll_ctl: %s\n", strerror(errno));
		abort();
	}
	w->events = events;
}

/* ---- frames out --------------------------------------------------------------------------------------- */

size_t frame_begin(struct buf *b)
{
	size_t start = b->len;
	buf_append(b, "\0\0\0\0", 4);
	return start;
}

void frame_end(struct buf *b, size_t start)
{
	size_t n = b->len - start - 4;
	uint8_t *p = b->data + start;
	p[0] = (uint8_t)(n >> 24), p[1] = (uint8_t)(n >> 16), p[2] = (uint8_t)(n >> 8), p[3] = (uint8_t)n;
}

struct client *client_by_serial(uint64_t serial)
{
	for (struct client *c = A.clients; c; c = c->next)
		if (c->serial == serial)
			return c;
	return NULL;
}

static void client_close(struct client *c);

static void client_watch(struct client *c)
{
	size_t pending = c->out.len - c->out_off;
	uint32_t events = 0;
	if (!c->closing && pending < OUT_HIGH)
		events |= EPOLLIN;
	if (pending)
		events |= EPOLLOUT;
	watch_set(&c->w, events ? events : EPOLLRDHUP);
}

void client_flush(struct client *c)
{
	size_t before = c->out.len - c->out_off;
	while (c->out_off < c->out.len) {
		ssize_t n = send(c->w.fd, c->out.data + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		if (n <= 0) {
			client_close(c);
			return;
		}
		c->out_off += (size_t)n;
	}
	if (c->out_off == c->out.len) {
		c->out.len = c->out_off = 0;
		if (c->closing) {
			client_close(c);
			return;
		}
	} else if (c->out_off > (1u << 20)) {
		memmove(c->out.data, c->out.data + c->out_off, c->out.len - c->out_off);
		c->out.len -= c->out_off;
		c->out_off = 0;
	}
	size_t after = c->out.len - c->out_off;
	client_watch(c);
	if (before >= OUT_LOW && after < OUT_LOW)
		proc_client_drained(c->serial);
}

/* ---- answers ------------------------------------------------------------------------------------------ */

static size_t answer_begin(struct buf *b, const struct reqid *id, const char *kind)
{
	size_t start = frame_begin(b);
	mp_put_map(b, 2);
	mp_put_cstr(b, "id");
	if (id->len)
		buf_append(b, id->raw, id->len);
	else
		mp_put_nil(b);
	mp_put_cstr(b, kind);
	return start;
}

static size_t reply_start;

struct buf *reply_begin(struct request *r)
{
	r->answered = true;
	reply_start = answer_begin(&r->client->out, &r->id, "result");
	return &r->client->out;
}

void reply_end(struct request *r)
{
	frame_end(&r->client->out, reply_start);
}

void reply_empty(struct request *r)
{
	mp_put_map(reply_begin(r), 0);
	reply_end(r);
}

static void put_error(struct buf *b, const struct reqid *id, int code, const char *fmt, va_list ap)
{
	char msg[512];
	vsnprintf(msg, sizeof msg, fmt, ap);
	size_t start = answer_begin(b, id, "error");
	mp_put_map(b, 2);
	mp_put_cstr(b, "code");
	mp_put_int(b, code);
	mp_put_cstr(b, "message");
	mp_put_text(b, msg);
	frame_end(b, start);
}

void reply_error(struct request *r, int code, const char *fmt, ...)
{
	va_list ap;
	r->answered = true;
	va_start(ap, fmt);
	put_error(&r->client->out, &r->id, code, fmt, ap);
	va_end(ap);
}

void pending_save(struct request *r, struct pending *p)
{
	r->answered = true;
	p->client = r->client->serial;
	p->id = r->id;
}

struct buf *pending_begin(const struct pending *p, size_t *start)
{
	struct client *c = client_by_serial(p->client);
	if (c == NULL)
		return NULL;
	*start = answer_begin(&c->out, &p->id, "result");
	return &c->out;
}

void pending_empty(const struct pending *p)
{
	size_t start;
	struct buf *b = pending_begin(p, &start);
	if (b == NULL)
		return;
	mp_put_map(b, 0);
	frame_end(b, start);
}

void pending_error(const struct pending *p, int code, const char *fmt, ...)
{
	struct client *c = client_by_serial(p->client);
	va_list ap;
	if (c == NULL)
		return;
	va_start(ap, fmt);
	put_error(&c->out, &p->id, code, fmt, ap);
	va_end(ap);
}

struct buf *event_begin(struct client *c, const char *name, size_t *start)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	*start = frame_begin(&c->out);
	mp_put_map(&c->out, 3);
	mp_put_cstr(&c->out, "event");
	mp_put_cstr(&c->out, name);
	mp_put_cstr(&c->out, "timestamp");
	mp_put_double(&c->out, (double)ts.tv_sec + ts.tv_nsec / 1e9);
	mp_put_cstr(&c->out, "data");
	return &c->out;
}

void event_end(struct client *c, size_t start)
{
	frame_end(&c->out, start);
}

/* ---- requests ----------------------------------------------------------------------------------------- */

struct method {
	const char *name;
	void (*fn)(struct request *);
	const char *params[24];
};

#define EXEC_PARAMS                                                                                        \
	"argv", "env", "cwd", "uid", "gid", "groups", "umask", "rlimits", "tty", "rows", "cols", "stdin",  \
		"window", "detach", "container", "join"

static const struct method methods[] = {
	{"ping", m_ping, {0}},
	{"version", m_version, {0}},
	{"exec", m_exec, {EXEC_PARAMS}},
	{"credit", m_credit, {"pid", "stream", "bytes"}},
	{"stdin", m_stdin, {"pid", "data"}},
	{"stdin-close", m_stdin_close, {"pid"}},
	{"signal", m_signal, {"pid", "signal", "group"}},
	{"resize", m_resize, {"pid", "rows", "cols"}},
	{"wait", m_wait, {"pid"}},
	{"attach", m_attach, {"pid", "window"}},
	{"processes", m_processes, {0}},
	{"file-put", m_file_put, {"path", "mode", "uid", "gid"}},
	{"file-write", m_file_write, {"handle", "data"}},
	{"file-commit", m_file_commit, {"handle", "size", "crc32"}},
	{"file-get", m_file_get, {"path"}},
	{"file-read", m_file_read, {"handle", "length"}},
	{"file-close", m_file_close, {"handle"}},
	{"stat", m_stat, {"path", "follow"}},
	{"list", m_list, {"path", "start"}},
	{"mkdir", m_mkdir, {"path", "mode", "parents"}},
	{"remove", m_remove, {"path", "recursive"}},
	{"set-time", m_set_time, {"seconds", "nanoseconds"}},
	{"add-entropy", m_add_entropy, {"data", "bits"}},
	{"sync", m_sync, {0}},
	{"poweroff", m_poweroff, {"reboot"}},
};

const char *method_name(size_t i)
{
	return i < sizeof methods / sizeof methods[0] ? methods[i].name : NULL;
}

static bool known_param(const struct method *m, const struct mp_value *key)
{
	for (size_t i = 0; i < sizeof m->params / sizeof m->params[0] && m->params[i]; i++)
		if (mp_str_is(key, m->params[i]))
			return true;
	return false;
}

static const struct mp_value empty_map = {.type = MP_MAP};

/* A frame's map to a request, as evmm.rpc.protocol.parse_request judges one; then its method. */
static void serve(struct request *r, const struct mp_value *msg)
{
	const struct mp_value *id = mp_map_get(msg, "id"), *method = mp_map_get(msg, "method");
	const struct mp_value *params = mp_map_get(msg, "params");
	if (id && ((id->type == MP_INT) || (id->type == MP_STR && id->len <= 256))) {
		struct buf b = {0};
		mp_put_value(&b, id);
		memcpy(r->id.raw, b.data, b.len);
		r->id.len = b.len;
		buf_free(&b);
	}
	for (uint32_t i = 0; i < msg->len; i++) {
		const struct mp_value *k = &msg->v.items[2 * i];
		if (!mp_str_is(k, "id") && !mp_str_is(k, "method") && !mp_str_is(k, "params")) {
			reply_error(r, E_INVALID_REQUEST, "unknown request field (a request has id, method and params)");
			return;
		}
	}
	if (r->id.len == 0) {
		reply_error(r, E_INVALID_REQUEST, id ? "request id must be an integer or a string of up to 256 characters" : "request has no id");
		return;
	}
	if (method == NULL || method->type != MP_STR || method->len == 0 || method->len > 64) {
		reply_error(r, E_INVALID_REQUEST, "request has no method (a string of 1 to 64 characters)");
		return;
	}
	memcpy(r->method, method->v.bytes, method->len);
	r->method[method->len] = 0;
	if (strlen(r->method) != method->len) {
		reply_error(r, E_INVALID_REQUEST, "method name holds a NUL byte");
		return;
	}
	if (params != NULL && params->type != MP_MAP && params->type != MP_NIL) {
		reply_error(r, E_INVALID_REQUEST, "params is not a map");
		return;
	}
	r->params = params && params->type == MP_MAP ? params : &empty_map;
	for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
		const struct method *m = &methods[i];
		if (strcmp(m->name, r->method) != 0)
			continue;
		for (uint32_t k = 0; k < r->params->len; k++) {
			const struct mp_value *key = &r->params->v.items[2 * k];
			if (!known_param(m, key)) {
				if (key->type == MP_STR)
					reply_error(r, E_INVALID_PARAMS, "%s: unknown parameter '%.*s'", m->name, (int)(key->len > 64 ? 64 : key->len), (const char *)key->v.bytes);
				else
					reply_error(r, E_INVALID_PARAMS, "%s: parameter names are strings", m->name);
				return;
			}
		}
		m->fn(r);
		if (!r->answered)
			reply_error(r, E_INTERNAL, "%s: no answer (an agent bug)", m->name);
		return;
	}
	reply_error(r, E_NO_METHOD, "no method '%s' (version lists them)", r->method);
}

static void handle_frame(struct client *c, const uint8_t *payload, size_t len)
{
	struct request r = {.client = c};
	struct mp_tree tree;
	char err[128];
	if (mp_decode(payload, len, &tree, err, sizeof err) < 0) {
		reply_error(&r, E_PARSE, "frame is not valid msgpack: %s", err);
		mp_tree_free(&tree);
		return;
	}
	if (tree.nodes[0].type != MP_MAP)
		reply_error(&r, E_INVALID_REQUEST, "frame does not hold a map");
	else
		serve(&r, &tree.nodes[0]);
	mp_tree_free(&tree);
}

/* ---- clients ------------------------------------------------------------------------------------------ */

static void client_read(struct client *c)
{
	buf_reserve(&c->in, 65536);
	ssize_t n = recv(c->w.fd, c->in.data + c->in.len, c->in.cap - c->in.len, MSG_DONTWAIT);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		client_close(c);
		return;
	}
	c->in.len += (size_t)n;
	size_t pos = 0;
	while (!c->closing && c->in.len - pos >= 4) {
		const uint8_t *p = c->in.data + pos;
		uint32_t length = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
		if (length == 0 || length > MAX_FRAME) {
			/* No trustworthy frame boundary is left: answer once, then hang up (as the VMM's server does). */
			struct request r = {.client = c};
			reply_error(&r, E_FRAME, "a frame of %u bytes: frames are 1 to %u bytes; closing the connection", length, MAX_FRAME);
			c->closing = true;
			break;
		}
		if (c->in.len - pos - 4 < length)
			break;
		handle_frame(c, p + 4, length);
		pos += 4 + length;
	}
	memmove(c->in.data, c->in.data + pos, c->in.len - pos);
	c->in.len -= pos;
	if (c->in.cap > 2 * MAX_FRAME && c->in.len < 65536) {
		buf_free(&c->in); /* one huge frame passed: give the memory back */
		buf_reserve(&c->in, 65536);
	}
	client_flush(c);
}

static void client_close(struct client *c)
{
	if (c->w.fd < 0)
		return;
	watch_set(&c->w, 0);
	close(c->w.fd);
	c->w.fd = -1;
	for (struct client **pp = &A.clients; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	A.nclients--;
	proc_client_gone(c->serial);
	files_client_gone(c);
	c->next = dead_clients; /* freed after this round of events, which may still name it */
	dead_clients = c;
}

static void accept_clients(int lfd)
{
	for (int i = 0; i < 16; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		struct client *c = calloc(1, sizeof *c);
		if (c == NULL) {
			close(fd);
			return;
		}
		c->w = (struct watch){.kind = W_CLIENT, .obj = c, .fd = fd};
		c->serial = ++A.next_serial;
		c->next_handle = 1;
		c->next = A.clients;
		A.clients = c;
		A.nclients++;
		if (A.nclients > MAX_CLIENTS) {
			struct request r = {.client = c};
			reply_error(&r, -32003, "the agent serves at most %d clients at once; closing the connection", MAX_CLIENTS);
			c->closing = true;
		}
		client_flush(c);
	}
}

/* ---- start-up ----------------------------------------------------------------------------------------- */

static int port_from_cmdline(void)
{
	char line[4096];
	int port = DEFAULT_PORT;
	FILE *f = fopen("/proc/cmdline", "re");
	if (f == NULL)
		return port;
	if (fgets(line, sizeof line, f)) {
		for (char *w = strtok(line, " \n"); w; w = strtok(NULL, " \n"))
			if (strncmp(w, "evmm_agent.port=", 16) == 0)
				port = atoi(w + 16);
	}
	fclose(f);
	return port;
}

static int listen_vsock(unsigned port)
{
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static int listen_unix(const char *path)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof addr.sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(addr.sun_path, path);
	unlink(path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0)
		return -1;
	return fd;
}

static void usage(void)
{
	fputs("usage: evmm-agent [--port N | --unix PATH]\n"
	      "Serves evmm's guest agent protocol on AF_VSOCK port N (default: evmm_agent.port= on the kernel\n"
	      "command line, else 1024), or on a Unix socket (for tests on the host).\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	int port = -1;
	const char *unix_path = NULL;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--port") == 0 && i + 1 < argc)
			port = atoi(argv[++i]);
		else if (strcmp(argv[i], "--unix") == 0 && i + 1 < argc)
			unix_path = argv[++i];
		else
			usage();
	}
	if (port < 0)
		port = port_from_cmdline();

	A.pid = getpid();
	A.host_mode = unix_path != NULL;
	A.epfd = epoll_create1(EPOLL_CLOEXEC);
	A.devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	A.self_pidns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
	if (A.epfd < 0 || A.devnull < 0) {
		fprintf(stderr, "evmm-agent: cannot start: %s\n", strerror(errno));
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	signal_watch.fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	watch_set(&signal_watch, EPOLLIN);

	/* Without a vsock device (or its module) there is nothing to serve yet; keep trying, quietly, rather
	 * than exit and be respawned in a tight loop by init. */
	for (int tries = 0;; tries++) {
		listen_watch.fd = unix_path ? listen_unix(unix_path) : listen_vsock((unsigned)port);
		if (listen_watch.fd >= 0)
			break;
		if (unix_path) {
			fprintf(stderr, "evmm-agent: %s: %s\n", unix_path, strerror(errno));
			return 1;
		}
		if (tries == 0)
			fprintf(stderr, "evmm-agent: vsock port %d: %s; retrying every 5 s\n", port, strerror(errno));
		sleep(5);
	}
	watch_set(&listen_watch, EPOLLIN);

	for (;;) {
		struct epoll_event evs[64];
		int64_t now = now_ms(), t1 = proc_timers(now), t2 = house_timers(now);
		int64_t timeout = t1 < 0 ? t2 : t2 < 0 ? t1 : t1 < t2 ? t1 : t2;
		int n = epoll_wait(A.epfd, evs, 64, (int)timeout);
		for (int i = 0; i < n; i++) {
			struct watch *w = evs[i].data.ptr;
			uint32_t e = evs[i].events;
			if (w->fd < 0)
				continue; /* closed earlier in this round */
			switch (w->kind) {
			case W_LISTEN:
				accept_clients(w->fd);
				break;
			case W_SIGNAL: {
				struct signalfd_siginfo si;
				while (read(w->fd, &si, sizeof si) == sizeof si)
					;
				proc_reap();
				break;
			}
			case W_CLIENT: {
				struct client *c = w->obj;
				if (e & EPOLLOUT)
					client_flush(c);
				if (c->w.fd >= 0 && (e & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP)))
					client_read(c);
				break;
			}
			default:
				proc_event(w, e);
				break;
			}
		}
		/* Answers and events written this round go out now; a client that cannot take them waits on
		 * EPOLLOUT. */
		for (struct client *c = A.clients, *next; c; c = next) {
			next = c->next;
			if (c->out.len > c->out_off && !(c->w.events & EPOLLOUT))
				client_flush(c);
		}
		proc_collect();
		while (dead_clients) {
			struct client *c = dead_clients;
			dead_clients = c->next;
			buf_free(&c->in);
			buf_free(&c->out);
			free(c);
		}
	}
}
