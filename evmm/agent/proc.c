/* Processes: exec, their output streams with credit, stdin with acknowledgements, signals, pty resize,
 * exit and wait (docs/agent-protocol.md, "Processes" and "Flow control").
 *
 * Output: each stream has a window of bytes the owning client will take; the agent reads a pipe only while
 * its window is open and the client's unsent bytes are under OUT_HIGH, so a process printing without end
 * blocks in write(2) once its pipe is full, and neither side's memory grows.  Input: a stdin write is
 * answered once its bytes are in the pipe; at most STDIN_QUEUE bytes wait in the agent.
 *
 * Exit: the exit event follows the process's last output.  Once the process is reaped the agent reads on
 * until the streams end; descendants still holding them open get GRACE_MS of quiet before the agent stops
 * waiting (their later output is lost, as it is with a shell's `cmd &`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

#define STDIN_QUEUE (4u << 20)
#define GRACE_MS 200
#define MAX_WINDOW (1ull << 30)

static struct proc *dead_procs;
static const char *stream_names[2] = {"stdout", "stderr"};

static struct proc *find(pid_t pid)
{
	for (struct proc *p = A.procs; p; p = p->next)
		if (p->pid == pid)
			return p;
	return NULL;
}

static struct client *owner_of(const struct proc *p)
{
	return p->owner ? client_by_serial(p->owner) : NULL;
}

static void close_watch(struct watch *w)
{
	if (w->fd < 0)
		return;
	watch_set(w, 0);
	close(w->fd);
	w->fd = -1;
}

static void nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ---- output ------------------------------------------------------------------------------------------- */

static void stream_arm(struct proc *p, int i)
{
	struct stream *st = &p->out[i];
	struct client *c = owner_of(p);
	bool want = p->started && c && st->window > 0 && c->out.len - c->out_off < OUT_HIGH;
	watch_set(&st->w, want ? EPOLLIN : 0);
}

static void put_status(struct buf *b, const struct proc *p)
{
	mp_put_map(b, 4);
	mp_put_cstr(b, "pid");
	mp_put_int(b, p->pid);
	mp_put_cstr(b, "code");
	if (WIFEXITED(p->status))
		mp_put_int(b, WEXITSTATUS(p->status));
	else
		mp_put_nil(b);
	mp_put_cstr(b, "signal");
	if (WIFSIGNALED(p->status))
		mp_put_int(b, WTERMSIG(p->status));
	else
		mp_put_nil(b);
	mp_put_cstr(b, "core_dumped");
	mp_put_bool(b, WIFSIGNALED(p->status) && WCOREDUMP(p->status));
}

static void free_proc(struct proc *p)
{
	for (struct proc **pp = &A.procs; *pp; pp = &(*pp)->next)
		if (*pp == p) {
			*pp = p->next;
			break;
		}
	A.nprocs--;
	for (int i = 0; i < 2; i++)
		close_watch(&p->out[i].w);
	close_watch(&p->in);
	close_watch(&p->sync);
	if (p->master >= 0)
		close(p->master);
	while (p->in_head) {
		struct chunk *c = p->in_head;
		p->in_head = c->next;
		free(c->data);
		free(c);
	}
	buf_free(&p->sync_msg);
	free(p->waits);
	free(p->name);
	p->next = dead_procs; /* freed after this round of events */
	dead_procs = p;
}

void proc_collect(void)
{
	while (dead_procs) {
		struct proc *p = dead_procs;
		dead_procs = p->next;
		free(p);
	}
}

static void stdin_fail(struct proc *p, const char *why)
{
	while (p->in_head) {
		struct chunk *c = p->in_head;
		p->in_head = c->next;
		pending_error(&c->ack, E_FAILED, "stdin of process %d: %s", (int)p->pid, why);
		free(c->data);
		free(c);
	}
	p->in_tail = NULL;
	p->in_bytes = 0;
	p->in_closed = true;
	close_watch(&p->in);
}

/* Everything the process will say has been passed on: the exit event, then the waiters' answers. */
static void maybe_finish(struct proc *p)
{
	if (!p->exited || p->sync.fd >= 0)
		return;
	if (p->failed) {
		free_proc(p);
		return;
	}
	if (p->out[0].w.fd >= 0 || p->out[1].w.fd >= 0)
		return;
	stdin_fail(p, "the process has exited");
	struct client *c = owner_of(p);
	if (c) {
		size_t start;
		struct buf *b = event_begin(c, "exit", &start);
		put_status(b, p);
		event_end(c, start);
	}
	for (size_t i = 0; i < p->nwaits; i++) {
		size_t start;
		struct buf *b = pending_begin(&p->waits[i], &start);
		if (b) {
			put_status(b, p);
			frame_end(b, start);
		}
	}
	/* A detached process nobody has claimed keeps its status for a later attach or wait. */
	if (c || !p->detached || p->nwaits)
		free_proc(p);
}

static void stream_end(struct proc *p, int i)
{
	close_watch(&p->out[i].w);
	p->out[i].eof = true;
	maybe_finish(p);
}

static void stream_read(struct proc *p, int i)
{
	static uint8_t tmp[MAX_CHUNK];
	struct stream *st = &p->out[i];
	struct client *c = owner_of(p);
	if (c == NULL || st->window == 0) {
		stream_arm(p, i);
		return;
	}
	size_t want = st->window < MAX_CHUNK ? (size_t)st->window : MAX_CHUNK;
	ssize_t n = read(st->w.fd, tmp, want);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) { /* EOF; EIO on a pty master once every slave fd is closed */
		stream_end(p, i);
		return;
	}
	size_t start;
	struct buf *b = event_begin(c, "output", &start);
	mp_put_map(b, 3);
	mp_put_cstr(b, "pid");
	mp_put_int(b, p->pid);
	mp_put_cstr(b, "stream");
	mp_put_cstr(b, stream_names[i]);
	mp_put_cstr(b, "data");
	mp_put_bin(b, tmp, (size_t)n);
	event_end(c, start);
	st->window -= (uint64_t)n;
	if (p->exited)
		p->grace_deadline = now_ms() + GRACE_MS;
	stream_arm(p, i);
}

/* ---- input -------------------------------------------------------------------------------------------- */

static void stdin_flush(struct proc *p)
{
	while (p->in_head) {
		struct chunk *c = p->in_head;
		while (c->off < c->len) {
			ssize_t n = write(p->in.fd, c->data + c->off, c->len - c->off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0 && errno == EAGAIN) {
				watch_set(&p->in, EPOLLOUT);
				return;
			}
			if (n < 0) {
				stdin_fail(p, errno == EPIPE ? "the process closed its input" : strerror(errno));
				return;
			}
			c->off += (size_t)n;
		}
		p->in_head = c->next;
		if (p->in_head == NULL)
			p->in_tail = NULL;
		p->in_bytes -= c->len;
		if (c->close) {
			close_watch(&p->in);
			pending_empty(&c->ack);
		} else {
			size_t start;
			struct buf *b = pending_begin(&c->ack, &start);
			if (b) {
				mp_put_map(b, 1);
				mp_put_cstr(b, "written");
				mp_put_uint(b, c->len);
				frame_end(b, start);
			}
		}
		free(c->data);
		free(c);
	}
	watch_set(&p->in, 0);
}

static void stdin_queue(struct request *r, struct proc *p, const uint8_t *data, size_t len, bool close)
{
	struct chunk *c = calloc(1, sizeof *c);
	if (c == NULL || (len && (c->data = malloc(len)) == NULL))
		abort();
	if (len)
		memcpy(c->data, data, len);
	c->len = len;
	c->close = close;
	pending_save(r, &c->ack);
	if (p->in_tail)
		p->in_tail->next = c;
	else
		p->in_head = c;
	p->in_tail = c;
	p->in_bytes += len;
	if (close)
		p->in_closed = true;
	stdin_flush(p);
}

/* ---- exec --------------------------------------------------------------------------------------------- */

static int open_pty(uint16_t rows, uint16_t cols, int *slave)
{
	int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (m < 0)
		return -1;
	struct winsize ws = {.ws_row = rows, .ws_col = cols};
	if (unlockpt(m) < 0 || ioctl(m, TIOCSWINSZ, &ws) < 0)
		goto fail;
	/* TIOCGPTPEER (Linux 4.13) opens the slave without a path: inside another mount namespace the
	 * /dev/pts/N of this devpts may not exist. */
	*slave = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*slave < 0) {
		char name[64];
		if (ptsname_r(m, name, sizeof name) != 0 || (*slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
			goto fail;
	}
	return m;
fail:
	close(m);
	return -1;
}

static int open_ns(pid_t pid, const char *ns)
{
	char theirs[64], ours[64];
	struct stat a, b;
	snprintf(theirs, sizeof theirs, "/proc/%d/ns/%s", (int)pid, ns);
	snprintf(ours, sizeof ours, "/proc/self/ns/%s", ns);
	if (stat(theirs, &a) == 0 && stat(ours, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev)
		return -2; /* shared already: nothing to join */
	return open(theirs, O_RDONLY | O_CLOEXEC);
}

struct launch {
	int in[2], out[2], err[2], sync[2];
	int master, slave;
	int pidns; /* the pid namespace the child must be born in, or -1 */
	struct child_fds cf;
};

static void launch_close(struct launch *l)
{
	int *fds[] = {&l->in[0], &l->in[1], &l->out[0], &l->out[1], &l->err[0], &l->err[1], &l->sync[0], &l->sync[1],
		      &l->master, &l->slave, &l->pidns, &l->cf.join_root, &l->cf.join_ns[0], &l->cf.join_ns[1],
		      &l->cf.join_ns[2], &l->cf.join_ns[3]};
	for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
		if (*fds[i] >= 0) {
			close(*fds[i]);
			*fds[i] = -1;
		}
}

/* Everything the fork needs, opened in the agent; a failure is answered here. */
static bool launch_prepare(struct request *r, const struct exec_spec *s, struct launch *l)
{
	static const char *ns_names[4] = {"ipc", "uts", "net", "mnt"};
	if (s->tty) {
		if ((l->master = open_pty(s->rows, s->cols, &l->slave)) < 0)
			goto fail;
		/* stdin is the terminal even when the host will not type: programs ask it (stty size, isatty). */
		l->cf.in = l->cf.out = l->cf.err = l->slave;
	} else {
		if (pipe2(l->out, O_CLOEXEC) < 0 || pipe2(l->err, O_CLOEXEC) < 0)
			goto fail;
		if (s->stdin && pipe2(l->in, O_CLOEXEC) < 0)
			goto fail;
		l->cf.in = s->stdin ? l->in[0] : A.devnull;
		l->cf.out = l->out[1];
		l->cf.err = l->err[1];
	}
	if (pipe2(l->sync, O_CLOEXEC) < 0)
		goto fail;
	l->cf.sync = l->sync[1];
	if (s->join) {
		char root[64];
		snprintf(root, sizeof root, "/proc/%d/root", (int)s->join);
		if ((l->cf.join_root = open(root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
			reply_error(r, E_FAILED, "exec: join %d: %s", (int)s->join, strerror(errno));
			return false;
		}
		for (int i = 0; i < 4; i++)
			if ((l->cf.join_ns[i] = open_ns(s->join, ns_names[i])) == -1) {
				reply_error(r, E_FAILED, "exec: join %d: its %s namespace: %s", (int)s->join, ns_names[i], strerror(errno));
				return false;
			}
		if ((l->pidns = open_ns(s->join, "pid")) == -1) {
			reply_error(r, E_FAILED, "exec: join %d: its pid namespace: %s", (int)s->join, strerror(errno));
			return false;
		}
		for (int i = 0; i < 4; i++)
			if (l->cf.join_ns[i] == -2)
				l->cf.join_ns[i] = -1;
		if (l->pidns == -2)
			l->pidns = -1;
	}
	return true;
fail:
	reply_error(r, E_FAILED, "exec: %s", strerror(errno));
	return false;
}

/* fork, in the pid namespace the child needs: a new one for a container (the child is its pid 1), the
 * target's when joining.  Both change only where this process's children are born (unshare(2), setns(2)),
 * so the agent goes back to its own namespace right after. */
static pid_t spawn(struct request *r, const struct exec_spec *s, struct launch *l)
{
	bool moved = false;
	if (s->rootfs && (s->nsflags & CLONE_NEWPID)) {
		if (unshare(CLONE_NEWPID) < 0) {
			reply_error(r, E_FAILED, "exec: unshare the pid namespace: %s", strerror(errno));
			return -1;
		}
		moved = true;
	} else if (l->pidns >= 0) {
		if (setns(l->pidns, CLONE_NEWPID) < 0) {
			reply_error(r, E_FAILED, "exec: join %d: setns pid: %s", (int)s->join, strerror(errno));
			return -1;
		}
		moved = true;
	}
	pid_t pid = fork();
	if (pid == 0)
		child_main(s, &l->cf);
	int e = errno;
	if (moved && setns(A.self_pidns, CLONE_NEWPID) < 0) {
		/* Later children would be born in the wrong namespace: better to stop and be respawned. */
		fprintf(stderr, "evmm-agent: cannot return to its own pid namespace: %s\n", strerror(errno));
		abort();
	}
	if (pid < 0)
		reply_error(r, E_FAILED, "exec: fork: %s", strerror(e));
	return pid;
}

static void watch_init(struct watch *w, enum watch_kind kind, struct proc *p, int index, int fd)
{
	*w = (struct watch){.kind = kind, .obj = p, .index = index, .fd = fd};
	if (fd >= 0)
		nonblock(fd);
}

void m_exec(struct request *r)
{
	struct exec_spec s;
	struct launch l = {.in = {-1, -1}, .out = {-1, -1}, .err = {-1, -1}, .sync = {-1, -1}, .master = -1, .slave = -1, .pidns = -1,
			   .cf = {.join_root = -1, .join_ns = {-1, -1, -1, -1}}};
	if (!spec_parse(r, &s))
		goto out;
	if (A.nprocs >= MAX_PROCS) {
		reply_error(r, E_FAILED, "exec: the agent already runs %d processes", MAX_PROCS);
		goto out;
	}
	if (!launch_prepare(r, &s, &l))
		goto out;
	pid_t pid = spawn(r, &s, &l);
	if (pid < 0)
		goto out;

	struct proc *p = calloc(1, sizeof *p);
	if (p == NULL)
		abort();
	p->pid = pid;
	p->owner = r->client->serial;
	p->detached = s.detach;
	p->tty = s.tty;
	p->name = strdup(s.argv[0]);
	p->master = -1;
	if (s.tty) {
		p->master = l.master;
		watch_init(&p->out[0].w, W_OUT, p, 0, dup(l.master));
		watch_init(&p->out[1].w, W_OUT, p, 1, -1);
		watch_init(&p->in, W_IN, p, 0, s.stdin ? dup(l.master) : -1);
		l.master = -1;
	} else {
		watch_init(&p->out[0].w, W_OUT, p, 0, l.out[0]);
		watch_init(&p->out[1].w, W_OUT, p, 1, l.err[0]);
		watch_init(&p->in, W_IN, p, 0, l.in[1]);
		l.out[0] = l.err[0] = l.in[1] = -1;
	}
	p->out[0].window = p->out[1].window = s.window;
	p->out[1].eof = p->out[1].w.fd < 0;
	p->in_closed = p->in.fd < 0;
	watch_init(&p->sync, W_SYNC, p, 0, l.sync[0]);
	l.sync[0] = -1;
	watch_set(&p->sync, EPOLLIN);
	pending_save(r, &p->exec_reply);
	p->next = A.procs;
	A.procs = p;
	A.nprocs++;
out:
	launch_close(&l);
	spec_free(&s);
}

/* The sync pipe: EOF means the child exec'd (or failed to find its program: that is its exit code); bytes
 * before EOF are why its set-up failed. */
static void sync_event(struct proc *p)
{
	char tmp[512];
	ssize_t n = read(p->sync.fd, tmp, sizeof tmp);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n > 0) {
		if (p->sync_msg.len < 1024)
			buf_append(&p->sync_msg, tmp, (size_t)n);
		return;
	}
	close_watch(&p->sync);
	if (p->sync_msg.len) {
		p->failed = true;
		pending_error(&p->exec_reply, E_FAILED, "exec %s: %.*s", p->name, (int)p->sync_msg.len, (const char *)p->sync_msg.data);
		for (int i = 0; i < 2; i++)
			close_watch(&p->out[i].w);
		stdin_fail(p, "the process did not start");
	} else {
		p->started = true;
		size_t start;
		struct buf *b = pending_begin(&p->exec_reply, &start);
		if (b) {
			mp_put_map(b, 1);
			mp_put_cstr(b, "pid");
			mp_put_int(b, p->pid);
			frame_end(b, start);
		}
		for (int i = 0; i < 2; i++)
			stream_arm(p, i);
	}
	maybe_finish(p);
}

void proc_event(struct watch *w, uint32_t events)
{
	struct proc *p = w->obj;
	(void)events;
	switch (w->kind) {
	case W_OUT:
		stream_read(p, w->index);
		break;
	case W_IN:
		stdin_flush(p);
		break;
	case W_SYNC:
		sync_event(p);
		break;
	default:
		break;
	}
}

void proc_reap(void)
{
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		struct proc *p = find(pid);
		if (p == NULL || p->exited)
			continue;
		p->exited = true;
		p->status = status;
		p->grace_deadline = now_ms() + GRACE_MS;
		maybe_finish(p);
	}
}

int64_t proc_timers(int64_t now)
{
	int64_t next = -1;
	for (struct proc *p = A.procs, *nx; p; p = nx) {
		nx = p->next;
		if (!p->exited || !p->started || owner_of(p) == NULL)
			continue;
		if (p->out[0].w.fd < 0 && p->out[1].w.fd < 0)
			continue;
		if (now < p->grace_deadline) {
			int64_t left = p->grace_deadline - now;
			next = next < 0 || left < next ? left : next;
			continue;
		}
		/* Quiet for GRACE_MS since the exit: a stream with nothing left to read is held open by a
		 * descendant; one with bytes waiting waits for credit instead. */
		for (int i = 0; i < 2; i++) {
			int avail = 0;
			if (p->out[i].w.fd >= 0 && (ioctl(p->out[i].w.fd, FIONREAD, &avail) < 0 || avail == 0)) {
				close_watch(&p->out[i].w);
				p->out[i].eof = true;
			}
		}
		maybe_finish(p);
	}
	return next;
}

void proc_client_gone(uint64_t serial)
{
	for (struct proc *p = A.procs, *nx; p; p = nx) {
		nx = p->next;
		if (p->owner != serial)
			continue;
		p->owner = 0;
		if (p->detached) {
			for (int i = 0; i < 2; i++)
				stream_arm(p, i);
			continue;
		}
		/* The client's processes go with it (docs/agent-protocol.md, "Disconnects"): the whole process
		 * group, and in a pid namespace its pid 1, which takes the namespace with it. */
		if (!p->exited) {
			kill(-p->pid, SIGKILL);
			kill(p->pid, SIGKILL);
		}
		for (int i = 0; i < 2; i++)
			close_watch(&p->out[i].w);
		stdin_fail(p, "its client left");
		p->failed = true; /* nobody to tell: dropped once reaped */
		maybe_finish(p);
	}
}

void proc_client_drained(uint64_t serial)
{
	for (struct proc *p = A.procs; p; p = p->next)
		if (p->owner == serial)
			for (int i = 0; i < 2; i++)
				stream_arm(p, i);
}

/* ---- methods ------------------------------------------------------------------------------------------ */

/* The process named by params.pid; answered with an error when there is none. */
static struct proc *target(struct request *r, bool owned)
{
	int64_t pid;
	if (!p_int(r, "pid", &pid, 1, 0x7fffffff, true))
		return NULL;
	struct proc *p = find((pid_t)pid);
	if (p == NULL || p->failed) {
		reply_error(r, E_FAILED, "%s: no process %lld of this agent (it has exited, or never was)", r->method, (long long)pid);
		return NULL;
	}
	if (owned && p->owner != r->client->serial) {
		reply_error(r, E_FAILED, "%s: process %lld belongs to another client", r->method, (long long)pid);
		return NULL;
	}
	return p;
}

void m_credit(struct request *r)
{
	struct proc *p = target(r, true);
	int64_t bytes;
	const struct mp_value *v = mp_map_get(r->params, "stream");
	if (p == NULL || !p_int(r, "bytes", &bytes, 1, 1 << 30, true))
		return;
	int i = mp_str_is(v, "stdout") ? 0 : mp_str_is(v, "stderr") ? 1 : -1;
	if (i < 0) {
		reply_error(r, E_INVALID_PARAMS, "credit: stream must be stdout or stderr");
		return;
	}
	struct stream *st = &p->out[i];
	st->window = st->window + (uint64_t)bytes > MAX_WINDOW ? MAX_WINDOW : st->window + (uint64_t)bytes;
	stream_arm(p, i);
	reply_empty(r);
}

void m_stdin(struct request *r)
{
	struct proc *p = target(r, true);
	const uint8_t *data;
	size_t len;
	if (p == NULL || !p_bin(r, "data", &data, &len, true))
		return;
	if (p->in_closed) {
		reply_error(r, E_FAILED, "stdin: process %d has no open stdin (exec with stdin=true; not after stdin-close)", (int)p->pid);
		return;
	}
	if (p->in_bytes + len > STDIN_QUEUE) {
		reply_error(r, E_FAILED, "stdin: process %d already has %zu bytes waiting: wait for their answers first", (int)p->pid, p->in_bytes);
		return;
	}
	stdin_queue(r, p, data, len, false);
}

void m_stdin_close(struct request *r)
{
	struct proc *p = target(r, true);
	if (p == NULL)
		return;
	if (p->in_closed) {
		reply_empty(r);
		return;
	}
	if (p->tty) {
		/* A pty has no end of input: the line discipline's EOF character (VEOF, ^D) is what a reader sees
		 * as one, at the start of a line in canonical mode (termios(3)). */
		struct termios t;
		uint8_t eof = 4;
		if (tcgetattr(p->master, &t) == 0)
			eof = t.c_cc[VEOF];
		stdin_queue(r, p, &eof, 1, true);
	} else {
		stdin_queue(r, p, NULL, 0, true);
	}
}

void m_signal(struct request *r)
{
	struct proc *p = target(r, false);
	int sig;
	bool group = false;
	if (p == NULL || !p_signal(r, "signal", &sig) || !p_bool(r, "group", &group))
		return;
	if (p->exited) {
		reply_error(r, E_FAILED, "signal: process %d has exited", (int)p->pid);
		return;
	}
	if (kill(group ? -p->pid : p->pid, sig) < 0) {
		reply_error(r, E_FAILED, "signal: process %d: %s", (int)p->pid, strerror(errno));
		return;
	}
	reply_empty(r);
}

void m_resize(struct request *r)
{
	struct proc *p = target(r, false);
	int64_t rows, cols;
	if (p == NULL || !p_int(r, "rows", &rows, 1, 0xffff, true) || !p_int(r, "cols", &cols, 1, 0xffff, true))
		return;
	if (!p->tty) {
		reply_error(r, E_FAILED, "resize: process %d has no terminal (exec with tty=true)", (int)p->pid);
		return;
	}
	/* The kernel sends SIGWINCH to the terminal's foreground process group (tty_ioctl(4)). */
	struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	if (ioctl(p->master, TIOCSWINSZ, &ws) < 0) {
		reply_error(r, E_FAILED, "resize: %s", strerror(errno));
		return;
	}
	reply_empty(r);
}

void m_wait(struct request *r)
{
	struct proc *p = target(r, false);
	if (p == NULL)
		return;
	struct pending *w = realloc(p->waits, (p->nwaits + 1) * sizeof *w);
	if (w == NULL)
		abort();
	p->waits = w;
	pending_save(r, &p->waits[p->nwaits++]);
	maybe_finish(p); /* a detached process that exited unclaimed answers now */
}

void m_attach(struct request *r)
{
	struct proc *p = target(r, false);
	int64_t window = 256 << 10;
	if (p == NULL || !p_int(r, "window", &window, 1, 1 << 30, false))
		return;
	if (!p->detached || owner_of(p) != NULL) {
		reply_error(r, E_FAILED, "attach: process %d %s", (int)p->pid, p->detached ? "has a client already" : "was not started detached");
		return;
	}
	p->owner = r->client->serial;
	p->out[0].window = p->out[1].window = (uint64_t)window;
	p->grace_deadline = now_ms() + GRACE_MS;
	reply_empty(r);
	for (int i = 0; i < 2; i++)
		stream_arm(p, i);
	maybe_finish(p);
}

void m_processes(struct request *r)
{
	uint32_t n = 0;
	for (struct proc *p = A.procs; p; p = p->next)
		n += !p->failed;
	struct buf *b = reply_begin(r);
	mp_put_array(b, n);
	for (struct proc *p = A.procs; p; p = p->next) {
		if (p->failed)
			continue;
		mp_put_map(b, 6);
		mp_put_cstr(b, "pid");
		mp_put_int(b, p->pid);
		mp_put_cstr(b, "name");
		mp_put_text(b, p->name);
		mp_put_cstr(b, "tty");
		mp_put_bool(b, p->tty);
		mp_put_cstr(b, "detached");
		mp_put_bool(b, p->detached);
		mp_put_cstr(b, "exited");
		mp_put_bool(b, p->exited);
		mp_put_cstr(b, "yours");
		mp_put_bool(b, p->owner == r->client->serial);
	}
	reply_end(r);
}
