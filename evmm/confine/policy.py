"""What each evmm thread may ask of the kernel once the guest runs: one allow-list per thread role.

The lists come from measurement (docs/security.md: ``strace -f`` of the linux tier's evmm processes inside
the KVM test host, per thread, from the moment each thread's filter went on), not from what seemed likely.
Each list is ordered hottest first, because the filter compares one rule after another.

Roles:
  ``main``  the reactor (the process's main thread): devices, control and QMP sockets, console, hot-replace,
            and the exit path.  Threads it starts after its filter (I/O workers) inherit this filter and
            stack their own on it, so it also holds what they need (filters stack: a call must pass both).
  ``vcpu``  a vCPU thread: KVM_RUN and the few ioctls an exit handled in place needs, eventfd writes.
  ``io``    an I/O worker (virtio-blk's, virtio-fs's, a snapshot's memory writer): positioned reads and
            writes, flush, fallocate, an eventfd.

The KVM, vhost and tap ioctls a role may issue are named; a machine with no tap or no vhost device gets no
such ioctl at all (``Features``).  ``socket`` is limited to the families evmm opens; ``clone`` to threads
(CLONE_THREAD: no fork); ``clone3`` answers ENOSYS (its flags are behind a pointer no filter can read;
glibc then uses ``clone``).
"""

from __future__ import annotations

import errno
import socket
import termios

from evmm.confine.bpf import ArgHasBits, ArgIn, Rule
from evmm.confine.ioctls import (
    FICLONE,
    SIOCGIFMTU,
    TUNGETIFF,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETQUEUE,
    TUNSETVNETHDRSZ,
)
from evmm.record import record

CLONE_THREAD = 0x00010000  # <linux/sched.h>
SECCOMP_SET_MODE_FILTER = 1  # <linux/seccomp.h>
# prctl(2) options evmm's threads use after set-up: naming a thread, reading a name (the SIGSYS line), and
# no_new_privs, which a new worker sets again before stacking its filter (it is inherited, so this changes
# nothing; only ever more restrictive).
PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS = 15, 16, 38

# <asm-generic/ioctls.h>: what Python's os and asyncio ask of any fd.
FIOCLEX, FIONCLEX, FIONBIO, FIONREAD = 0x5451, 0x5450, 0x5421, 0x541B

ROLES = ("main", "vcpu", "io")


@record(frozen=True)
class Features:
    """What this machine uses that widens the main thread's list."""

    tap: bool = False  # a virtio-net device or a net hot-replace slot
    vhost: bool = False  # --vsock vhost=on
    vhost_net: bool = False  # a NIC or net hot-replace slot that may be on vhost-net (--net ...,vhost=)
    fs: bool = False  # a --fs shared directory: its workers resolve and change files under it
    pci: bool = False  # the standard board: the guest programs MSI-X vectors, hotplug adds devices


# What a virtio-fs worker asks of the host file system (evmm.devices.virtio.fs.hostcalls and ops): every name
# resolved under a directory fd (openat2 with RESOLVE_BENEATH, the *at calls), attributes, directory listing,
# extended attributes through /proc/self/fd, and the FUSE operations' own calls.  No call takes a path the
# guest wrote that is not below such an fd.
_FS = (
    # chmod and renameat: CPython's os.chmod on a /proc/self/fd/N path, glibc's renameat2 with no flags.
    "chmod",
    "renameat",
    "openat2",
    "openat",
    "newfstatat",
    "fstat",
    "statx",
    "getdents64",
    "mkdirat",
    "mknodat",
    "unlinkat",
    "renameat2",
    "linkat",
    "symlinkat",
    "readlinkat",
    "fchmodat",
    "fchmod",
    "fchownat",
    "fchown",
    "utimensat",
    "truncate",
    "ftruncate",
    "fstatfs",
    "statfs",
    "faccessat",
    "faccessat2",
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "lseek",
    "fsync",
    "fdatasync",
    "fallocate",
    "pread64",
    "pwrite64",
    "preadv2",
    "pwritev2",
    "close",
    "dup",
    "fcntl",
    "geteuid",
    "getegid",
)


def _kvm_ioctls(*names: str) -> tuple[int, ...]:
    from evmm.kvm._ffi import lib

    return tuple(int(getattr(lib, n)) for n in names)


# What every vhost device asks at activation, reset and snapshot (evmm.vhost.backend).
_VHOST = (
    "VHOST_SET_OWNER",
    "VHOST_GET_FEATURES",
    "VHOST_SET_FEATURES",
    "VHOST_SET_MEM_TABLE",
    "VHOST_SET_VRING_NUM",
    "VHOST_SET_VRING_ADDR",
    "VHOST_SET_VRING_BASE",
    "VHOST_GET_VRING_BASE",
    "VHOST_SET_VRING_KICK",
    "VHOST_SET_VRING_CALL",
)


def _vhost_ioctls(features: Features) -> tuple[int, ...]:
    """vhost-vsock's and vhost-net's ioctls, for the devices this machine may have; none without one.

    vhost-net attaches and detaches the tap at activation, reset and hot-replace (VHOST_NET_SET_BACKEND),
    and takes tap queues in and out of the spread when the guest changes its queue pairs (TUNSETQUEUE)."""
    from evmm.vhost._vhost_ffi import lib

    names: tuple[str, ...] = ()
    if features.vhost or features.vhost_net:
        names += _VHOST
    if features.vhost:
        names += ("VHOST_VSOCK_SET_GUEST_CID", "VHOST_VSOCK_SET_RUNNING")
    if features.vhost_net:
        names += ("VHOST_NET_SET_BACKEND",)
    extra = (TUNSETQUEUE,) if features.vhost_net else ()
    return tuple(int(getattr(lib, n)) for n in names) + extra


def _tap_ioctls() -> tuple[int, ...]:
    return (TUNSETIFF, TUNSETOFFLOAD, TUNGETIFF, TUNSETVNETHDRSZ, SIOCGIFMTU)


_TERMINAL = (termios.TCGETS, termios.TCSETS, termios.TCSETSW, termios.TCSETSF, termios.TIOCGWINSZ)

# What the interpreter and glibc do on any thread once it runs: memory, locks, signals, time, thread exit.
# (Hot calls are listed again, earlier, by each role: the first listing is the one the filter matches.)
_RUNTIME = (
    "futex",
    "madvise",
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "brk",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_yield",
    "clock_gettime",
    "clock_nanosleep",
    "gettid",
    "getpid",
    "restart_syscall",
    "exit",
    "exit_group",
)


def _rules(pid: int, hot: tuple[str | Rule, ...], prctl: tuple[int, ...], *rest: str | Rule) -> list[Rule]:
    """``hot`` first, then the runtime's calls, then ``rest``; each call once, at its first place."""
    out: list[Rule] = []
    seen: set[str] = set()
    for item in (
        *hot,
        *_RUNTIME,
        # pthread_kill: the vCPU kick, and a stop reaching every vCPU; only within this process.
        Rule("tgkill", ArgIn(0, (pid,))),
        Rule("prctl", ArgIn(0, prctl)),
        *rest,
    ):
        rule = item if isinstance(item, Rule) else Rule(item)
        if rule.syscall not in seen:
            seen.add(rule.syscall)
            out.append(rule)
    return out


# KVM state a snapshot reads (evmm/kvm/state.py).
_SNAPSHOT_READS = (
    "KVM_CHECK_EXTENSION",
    "KVM_GET_MSR_INDEX_LIST",
    "KVM_GET_MSRS",
    "KVM_GET_TSC_KHZ",
    "KVM_GET_CPUID2",
    "KVM_GET_MP_STATE",
    "KVM_GET_FPU",
    "KVM_GET_XSAVE",
    "KVM_GET_XCRS",
    "KVM_GET_DEBUGREGS",
    "KVM_GET_LAPIC",
    "KVM_GET_VCPU_EVENTS",
    "KVM_GET_IRQCHIP",
    "KVM_GET_PIT2",
    "KVM_GET_CLOCK",
)
# Writing a snapshot's files: a state file and a sparse memory file written beside and renamed into place,
# disks copied extent by extent (evmm/snapshot/format.py, memfile.py, disks.py).  The memory file's pages are
# written by an I/O worker (``_SNAPSHOT_WORKER``), whose filter stacks on this one, so these stay here too.
_SNAPSHOT_FILES = ("mkdir", "ftruncate", "rename", "mincore", "copy_file_range")


def main_rules(pid: int, features: Features) -> list[Rule]:
    ioctls = _kvm_ioctls(
        "KVM_IRQ_LINE",
        "KVM_SIGNAL_MSI",
        "KVM_IOEVENTFD",
        "KVM_IRQFD",
        "KVM_GET_REGS",
        "KVM_GET_SREGS",
    )
    ioctls += (FIOCLEX, FIONCLEX, FIONBIO, FIONREAD, *_TERMINAL)
    # A snapshot of the paused VM (evmm/snapshot/save.py, on the reactor): what KVM has of each vCPU and of
    # the VM, read only; restoring it happens in a new process, before its filter goes on.
    ioctls += _kvm_ioctls(*_SNAPSHOT_READS)
    ioctls += (FICLONE,)  # a snapshot's disk copy shares the image's extents where the file system can
    if features.pci:
        # A guest's MSI-X table or MSI capability write (served on the reactor) reroutes a vector: the whole
        # GSI table is set again (evmm.machine.msi).
        ioctls += _kvm_ioctls("KVM_SET_GSI_ROUTING")
    ioctls += _vhost_ioctls(features)
    if features.tap:
        ioctls += _tap_ioctls()
    families = (socket.AF_UNIX, socket.AF_INET) if features.tap else (socket.AF_UNIX,)
    # Measured order (docs/security.md); clock_gettime is a system call where the clocksource has no vDSO.
    hot = (
        "clock_gettime",
        "futex",
        "epoll_pwait",
        "read",
        "write",
        Rule("ioctl", ArgIn(1, ioctls)),
        "epoll_ctl",
        "close",
        "rt_sigprocmask",
        "getpid",
        "gettid",
        "mmap",
        "getrandom",
        "munmap",
        "mprotect",
        "recvfrom",
    )
    return _rules(
        pid,
        hot,
        (PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS),
        "sendto",
        "recvmsg",
        "sendmsg",
        "readv",
        "writev",
        # What the I/O workers it starts need (their filters stack on this one); CPython's os.preadv and
        # os.pwritev are preadv2 and pwritev2 (measured), RWF_NOWAIT reads on the reactor too.
        "preadv2",
        "pwritev2",
        "pwrite64",
        "fdatasync",
        "fsync",
        "fallocate",
        "accept4",
        "close",
        "fcntl",
        "getsockopt",
        "setsockopt",
        "getsockname",
        "getpeername",
        "shutdown",
        Rule("socket", ArgIn(0, families)),
        Rule("socketpair", ArgIn(0, (socket.AF_UNIX,))),
        "connect",
        "eventfd2",
        "openat",
        "newfstatat",
        "fstat",
        "statx",
        "lseek",
        "unlink",
        "poll",
        "select",
        "pselect6",
        "getrandom",
        "rt_sigaction",
        "sigaltstack",
        # Starting I/O workers: threads only, never a process.
        Rule("clone", ArgHasBits(0, CLONE_THREAD)),
        Rule("clone3", errno=errno.ENOSYS),
        "set_robust_list",
        "rseq",
        # A worker stacks its own filter on this one.
        Rule("seccomp", ArgIn(0, (SECCOMP_SET_MODE_FILTER,))),
        *_SNAPSHOT_FILES,
        # No getdents64 (but with a shared directory, for its workers): what the control methods import on
        # first use is imported before this filter goes on (evmm.confine.preload).
        *(_FS if features.fs else ()),
    )


def vcpu_rules(pid: int) -> list[Rule]:
    ioctls = _kvm_ioctls("KVM_RUN", "KVM_IRQ_LINE", "KVM_SIGNAL_MSI", "KVM_GET_REGS", "KVM_GET_SREGS")
    hot = ("clock_gettime", Rule("ioctl", ArgIn(1, ioctls)), "futex", "write")  # measured order
    return _rules(pid, hot, (PR_SET_NAME, PR_GET_NAME))


# A snapshot's memory file, written by an I/O worker (evmm/snapshot/memfile.py ``write_memory``; measured with
# strace -f on evmm run + pause + snapshot): its size set, which pages are resident, the data extents of a
# memory file a restored guest still maps (lseek SEEK_DATA/SEEK_HOLE, from the code: a restore does not run
# on this host's PVM KVM), the pages written, fsync, and the fd closed by the worker that owns it.
_SNAPSHOT_WORKER = ("ftruncate", "mincore", "lseek", "fsync", "close")


def io_rules(pid: int, features: Features) -> list[Rule]:
    hot = ("futex", "clock_gettime", "write", "munmap", "gettid", "pwritev2", "preadv2")  # measured order
    return _rules(
        pid,
        hot,
        (PR_SET_NAME, PR_GET_NAME),
        "fdatasync",
        "fallocate",
        "pwrite64",
        *_SNAPSHOT_WORKER,
        *(_FS if features.fs else ()),
    )


def rules(role: str, pid: int, features: Features) -> list[Rule]:
    if role == "main":
        return main_rules(pid, features)
    if role == "vcpu":
        return vcpu_rules(pid)
    if role == "io":
        return io_rules(pid, features)
    raise ValueError(f"no seccomp role {role!r} (roles: {', '.join(ROLES)})")
