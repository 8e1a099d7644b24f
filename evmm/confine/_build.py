"""cffi builder for evmm's seccomp glue (API mode): installing a filter on the calling thread, and the SIGSYS
handler that turns a refused system call into one line and an exit.

Why a handler in C: a filter's SECCOMP_RET_TRAP raises SIGSYS synchronously in the thread that made the call,
in the middle of whatever that thread was doing: in a libc call with the GIL released (a vCPU in ``ioctl``, a
worker in ``preadv``), or inside the interpreter with the GIL held.  A Python-level handler would run only
later on the main thread, without the ``siginfo_t`` that names the call; a ctypes callback would take the GIL
and run bytecode inside an arbitrary interpreter state.  This handler uses only async-signal-safe calls
(signal-safety(7)): ``gettid``, ``prctl(PR_GET_NAME)``, ``write`` and ``exit_group``, which every role's
filter allows, and formats the line itself.  The alternative, SECCOMP_RET_KILL_PROCESS with the parent
reading the audit log, needs CAP_SYSLOG and a kernel that logs (``kernel.seccomp.actions_logged``, rate
limits), so it cannot promise the line.
"""

from __future__ import annotations

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    r"""
#define EVMM_MAX_SYSCALL ...
int evmm_seccomp_install(const void *prog, unsigned short len, const char *role);
int evmm_seccomp_handle_sigsys(int exit_code);
void evmm_seccomp_name_syscall(int nr, const char *name);
"""
)

ffibuilder.set_source(
    "evmm.confine._seccomp_ffi",
    r"""
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define EVMM_MAX_SYSCALL 512
#define EVMM_MAX_THREADS 256
#define SYS_SECCOMP_CODE 1  /* si_code of a seccomp SIGSYS (<asm-generic/siginfo.h>) */

static char syscall_names[EVMM_MAX_SYSCALL][24];
static int sigsys_exit_code = 159;

/* Which role each filtered thread has, by tid: appended by the thread itself before its filter goes on,
   read (never written) by the handler.  A slot is claimed with an atomic add, filled, then published. */
static struct { volatile long tid; char role[16]; } threads[EVMM_MAX_THREADS];
static volatile int nthreads;

void evmm_seccomp_name_syscall(int nr, const char *name)
{
    if (nr >= 0 && nr < EVMM_MAX_SYSCALL) {
        strncpy(syscall_names[nr], name, sizeof syscall_names[nr] - 1);
    }
}

static void note_thread(const char *role)
{
    int i = __atomic_fetch_add(&nthreads, 1, __ATOMIC_SEQ_CST);
    if (i >= EVMM_MAX_THREADS) {
        return; /* the line then names the thread without its role */
    }
    strncpy(threads[i].role, role, sizeof threads[i].role - 1);
    __atomic_store_n(&threads[i].tid, (long)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
}

int evmm_seccomp_install(const void *prog, unsigned short len, const char *role)
{
    struct sock_fprog fprog = { .len = len, .filter = (struct sock_filter *)prog };
    note_thread(role);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        return -errno;
    }
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) != 0) {
        return -errno;
    }
    return 0;
}

/* ---- the handler: async-signal-safe only ---- */

struct line { char buf[512]; size_t n; };

static void put(struct line *l, const char *s)
{
    while (*s && l->n < sizeof l->buf - 1) {
        l->buf[l->n++] = *s++;
    }
}

static void put_dec(struct line *l, unsigned long v)
{
    char tmp[24];
    int i = 0;
    do { tmp[i++] = (char)('0' + v % 10); v /= 10; } while (v && i < 23);
    while (i && l->n < sizeof l->buf - 1) {
        l->buf[l->n++] = tmp[--i];
    }
}

static void put_hex(struct line *l, unsigned long v)
{
    char tmp[20];
    int i = 0;
    put(l, "0x");
    do { tmp[i++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v && i < 19);
    while (i && l->n < sizeof l->buf - 1) {
        l->buf[l->n++] = tmp[--i];
    }
}

static void on_sigsys(int sig, siginfo_t *info, void *ctx)
{
    struct line l = { .n = 0 };
    long tid = syscall(SYS_gettid);
    char comm[17] = { 0 };
    (void)sig;
    prctl(PR_GET_NAME, comm, 0, 0, 0);
    put(&l, "evmm: seccomp: thread ");
    put(&l, comm);
    put(&l, " (");
    int n = __atomic_load_n(&nthreads, __ATOMIC_SEQ_CST);
    if (n > EVMM_MAX_THREADS) {
        n = EVMM_MAX_THREADS;
    }
    for (int i = n - 1; i >= 0; i--) { /* newest first: a thread's last filter names its role */
        if (__atomic_load_n(&threads[i].tid, __ATOMIC_SEQ_CST) == tid) {
            put(&l, "role ");
            put(&l, threads[i].role);
            put(&l, ", ");
            break;
        }
    }
    put(&l, "tid ");
    put_dec(&l, (unsigned long)tid);
    if (info->si_code != SYS_SECCOMP_CODE) {
        put(&l, ") got a SIGSYS not from its filter (code ");
        put_dec(&l, (unsigned long)(long)info->si_code);
        put(&l, "); stopping\n");
    } else {
        int nr = info->si_syscall;
        const greg_t *r = ((ucontext_t *)ctx)->uc_mcontext.gregs;
        /* The x86-64 system call ABI: arguments in rdi, rsi, rdx, r10, r8, r9. */
        const int regs[6] = { REG_RDI, REG_RSI, REG_RDX, REG_R10, REG_R8, REG_R9 };
        put(&l, ") made a forbidden system call: ");
        if (nr >= 0 && nr < EVMM_MAX_SYSCALL && syscall_names[nr][0]) {
            put(&l, syscall_names[nr]);
        } else {
            put(&l, "syscall_");
            put_dec(&l, (unsigned long)nr);
        }
        put(&l, "(");
        for (int i = 0; i < 6; i++) {
            if (i) {
                put(&l, ", ");
            }
            put_hex(&l, (unsigned long)r[regs[i]]);
        }
        put(&l, "); stopping the VM\n");
    }
    for (size_t off = 0; off < l.n;) {
        ssize_t w = write(2, l.buf + off, l.n - off);
        if (w <= 0) {
            break;
        }
        off += (size_t)w;
    }
    syscall(SYS_exit_group, sigsys_exit_code);
}

int evmm_seccomp_handle_sigsys(int exit_code)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    sigsys_exit_code = exit_code;
    return sigaction(SIGSYS, &sa, NULL) == 0 ? 0 : -errno;
}
""",
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
