/* evmm-agent: runs programs and moves files in a guest for the host, over vsock (docs/agent-protocol.md).
 *
 * One process, one thread, one epoll loop.  Objects registered with epoll carry a `struct watch`, which
 * says what the fd is; everything else is reached from the two lists in `struct agent`.
 */
#ifndef EVMM_AGENT_H
#define EVMM_AGENT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#include "mpack.h"

#define AGENT_VERSION "0.1.0"
#define PROTOCOL_VERSION 1
#define DEFAULT_PORT 1024
#define MAX_FRAME (1u << 20) /* the host's evmm.rpc.protocol.MAX_FRAME */
#define MAX_CHUNK (256u << 10) /* data bytes in one output event, stdin write or file read */
#define OUT_HIGH (4u << 20) /* a client's unsent bytes above which the agent stops producing for it */
#define OUT_LOW (1u << 20)
#define MAX_CLIENTS 64
#define MAX_PROCS 1024

/* evmm.rpc.protocol.ErrorCode */
enum {
	E_PARSE = -32700,
	E_INVALID_REQUEST = -32600,
	E_NO_METHOD = -32601,
	E_INVALID_PARAMS = -32602,
	E_INTERNAL = -32603,
	E_FRAME = -32000,
	E_FAILED = -32002,
	E_OS = -33000, /* a system call failed on a path: the code is E_OS - errno */
};

enum watch_kind { W_LISTEN, W_CLIENT, W_SIGNAL, W_OUT, W_IN, W_SYNC };

struct watch {
	enum watch_kind kind;
	void *obj;
	int index; /* W_OUT: 0 stdout, 1 stderr */
	int fd;
	uint32_t events; /* what epoll watches now; 0 = not registered */
};

/* A request id as it came, msgpack-encoded, so that the answer carries it back unchanged. */
struct reqid {
	uint8_t raw[272];
	size_t len;
};

/* An answer owed later (exec, stdin, wait): the client is named by serial, so a client gone meanwhile is
 * noticed instead of written to. */
struct pending {
	uint64_t client;
	struct reqid id;
};

struct fhandle;

struct client {
	struct watch w;
	uint64_t serial;
	struct buf in;
	struct buf out;
	size_t out_off; /* bytes of out already sent */
	bool closing; /* hang up once out is flushed (after a fatal framing error) */
	struct fhandle *files;
	uint32_t next_handle;
	struct client *next;
};

struct chunk {
	struct chunk *next;
	uint8_t *data;
	size_t len, off;
	struct pending ack;
	bool close; /* stdin-close: close the pipe once everything before it is written */
};

struct stream {
	struct watch w;
	uint64_t window; /* bytes the owner will take now (credit) */
	bool eof;
};

struct proc {
	pid_t pid;
	uint64_t owner; /* client serial; 0 once its client left */
	bool detached, tty, started, failed, exited;
	int status; /* from waitpid */
	struct stream out[2];
	int master; /* tty: the pty master, for resize (out[0] and stdin use dups of it) */
	struct watch in;
	struct chunk *in_head, *in_tail;
	size_t in_bytes;
	bool in_closed;
	struct watch sync; /* CLOEXEC pipe: EOF once the child exec'd; a message if its set-up failed */
	struct buf sync_msg;
	struct pending exec_reply;
	int64_t grace_deadline; /* ms (monotonic): after exit, how long descendants may hold the streams */
	struct pending *waits;
	size_t nwaits;
	char *name; /* argv[0], for listings */
	struct proc *next;
};

struct agent {
	int epfd;
	int devnull;
	int self_pidns; /* this process's pid namespace, restored after forking into another */
	pid_t pid;
	uint64_t next_serial;
	struct client *clients;
	struct proc *procs;
	size_t nclients, nprocs;
	bool host_mode; /* --unix: a test on a host; methods that would change the host are refused */
};

extern struct agent A;

/* A request being served: handlers answer it once, with reply_* or by saving a `pending`. */
struct request {
	struct client *client;
	struct reqid id;
	char method[65];
	const struct mp_value *params; /* a map */
	bool answered;
};

/* ---- main.c: the loop, clients, frames ---- */
int64_t now_ms(void);
void watch_set(struct watch *w, uint32_t events);
struct client *client_by_serial(uint64_t serial);
size_t frame_begin(struct buf *b);
void frame_end(struct buf *b, size_t start);
void client_flush(struct client *c);
/* Start a response; the caller writes exactly one result value, then calls reply_end. */
struct buf *reply_begin(struct request *r);
struct buf *pending_begin(const struct pending *p, size_t *start);
void reply_end(struct request *r);
void reply_empty(struct request *r);
void reply_error(struct request *r, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void pending_save(struct request *r, struct pending *p);
void pending_empty(const struct pending *p);
void pending_error(const struct pending *p, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* An event to one client: returns the buffer to write the data map into; then event_end. */
struct buf *event_begin(struct client *c, const char *name, size_t *start);
void event_end(struct client *c, size_t start);

const char *method_name(size_t i); /* the i-th method, NULL past the last */

/* ---- params.c: typed parameters; each getter answers INVALID_PARAMS itself and returns false ---- */
bool p_int(struct request *r, const char *key, int64_t *out, int64_t min, int64_t max, bool required);
bool p_bool(struct request *r, const char *key, bool *out);
bool p_cstr(struct request *r, const struct mp_value *v, const char *what, char **out);
bool p_string(struct request *r, const char *key, char **out, bool required);
bool p_bin(struct request *r, const char *key, const uint8_t **data, size_t *len, bool required);
bool p_strv(struct request *r, const struct mp_value *v, const char *what, char ***out);
void strv_free(char **v);
bool p_signal(struct request *r, const char *key, int *out);

/* ---- proc.c: processes ---- */
void m_exec(struct request *r);
void m_credit(struct request *r);
void m_stdin(struct request *r);
void m_stdin_close(struct request *r);
void m_signal(struct request *r);
void m_resize(struct request *r);
void m_wait(struct request *r);
void m_attach(struct request *r);
void m_processes(struct request *r);
void proc_event(struct watch *w, uint32_t events);
void proc_reap(void);
void proc_collect(void); /* frees what this round of events closed */
void proc_client_gone(uint64_t serial);
void proc_client_drained(uint64_t serial);
int64_t proc_timers(int64_t now); /* handles expired timers; returns ms until the next one, or -1 */

/* ---- spec.c and child.c: what to run, and setting it up in the child ---- */
struct mountspec {
	char *type, *source, *target, *data;
	unsigned long flags; /* MS_* for mount(2) */
	unsigned long propagation; /* MS_PRIVATE, MS_SHARED, ... (with MS_REC), applied after */
};

struct exec_spec {
	char **argv, **env, *cwd;
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	size_t ngroups;
	mode_t umask;
	struct {
		int resource;
		struct rlimit lim;
	} *rlimits;
	size_t nrlimits;
	bool tty, stdin, detach;
	uint16_t rows, cols;
	uint64_t window;
	/* container: the first process of one */
	char *rootfs, *hostname;
	struct mountspec *mounts;
	size_t nmounts;
	int nsflags; /* CLONE_NEW* */
	bool readonly_root;
	/* or a process joining one */
	pid_t join;
};

bool spec_parse(struct request *r, struct exec_spec *s);
void spec_free(struct exec_spec *s);

struct child_fds {
	int in, out, err; /* the child's stdio (all the pty slave with a tty) */
	int sync; /* write end of the sync pipe */
	int join_root; /* join: the target's /proc/PID/root, opened before setns; -1 otherwise */
	int join_ns[4]; /* join: ipc, uts, net, mnt namespace fds to enter, -1 for those shared already */
};

__attribute__((noreturn)) void child_main(const struct exec_spec *s, const struct child_fds *f);

/* ---- files.c ---- */
void m_file_put(struct request *r);
void m_file_write(struct request *r);
void m_file_commit(struct request *r);
void m_file_get(struct request *r);
void m_file_read(struct request *r);
void m_file_close(struct request *r);
void m_stat(struct request *r);
void m_list(struct request *r);
void m_mkdir(struct request *r);
void m_remove(struct request *r);
void files_client_gone(struct client *c);
uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n);

/* ---- house.c: housekeeping ---- */
void m_ping(struct request *r);
void m_version(struct request *r);
void m_set_time(struct request *r);
void m_add_entropy(struct request *r);
void m_sync(struct request *r);
void m_poweroff(struct request *r);
int64_t house_timers(int64_t now); /* a pending power-off; ms until due, or -1 */

#endif
