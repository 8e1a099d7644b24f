"""Putting each evmm thread under its role's seccomp filter (seccomp(2), SECCOMP_SET_MODE_FILTER).

``evmm run`` calls ``enable`` before any thread starts; each thread then calls ``confine_thread(role)``
(evmm.confine.thread) as its first act (a vCPU thread, an I/O worker), and the main thread confines itself
once the vCPU threads are started, before the reactor handles a single exit (``confine_main``).  Filters are per thread and inherited by
threads created later, and a thread's filters stack (every one must allow a call), so:

- vCPU threads are created before the main thread's filter and carry only their own;
- I/O workers start later, from the reactor, and carry the main filter with their own on top;
- ``confine_main`` checks that no other thread of the process is left without a filter.

Modes: ``kill`` (a refused call: the SIGSYS handler prints one line naming the call, its arguments and the
thread, and evmm exits with ``EXIT_SECCOMP``), ``log`` (the call goes through and the kernel logs it:
``dmesg``/audit type 1326), ``off``.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from evmm.confine.bpf import (
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_LOG,
    SECCOMP_RET_TRAP,
    Rule,
    assemble,
    compile_filter,
)
from evmm.confine.policy import ROLES, Features, rules
from evmm.confine.syscalls import NUMBERS
from evmm.confine.thread import active, set_active
from evmm.errors import EvmmError
from evmm.exitcodes import EXIT_SECCOMP

if TYPE_CHECKING:
    from evmm.machine.config import MachineConfig

THREAD_WAIT = 5.0  # seconds for threads started before the main filter to put on their own


class StartingMachine(Protocol):
    def stop(self, code: int, message: str) -> None: ...


class Mode(enum.Enum):
    KILL = "kill"
    LOG = "log"
    OFF = "off"


class Confinement:
    """The compiled filter of every role for this process, and which threads wear one."""

    def __init__(self, mode: Mode, features: Features, pid: int | None = None) -> None:
        self.mode = mode
        self.pid = os.getpid() if pid is None else pid
        mismatch = SECCOMP_RET_TRAP if mode is Mode.KILL else SECCOMP_RET_LOG
        self.programs = {
            role: assemble(compile_filter(rules(role, self.pid, features), mismatch)) for role in ROLES
        }
        self._lock = threading.Lock()
        self.confined: dict[int, str] = {}  # native thread id -> role

    def install(self, role: str) -> None:
        """Put the calling thread under ``role``'s filter; raise EvmmError with one line if the kernel says no."""
        from evmm.confine._seccomp_ffi import ffi, lib

        prog = self.programs[role]
        buf = ffi.from_buffer(prog)
        ret = lib.evmm_seccomp_install(buf, len(prog) // 8, role.encode())
        if ret < 0:
            raise EvmmError(f"seccomp: cannot install the {role} filter: {os.strerror(-ret)}")
        with self._lock:
            self.confined[threading.get_native_id()] = role

    def refuse_io_uring(self) -> None:
        """From now on this process gets no io_uring: io_uring_setup answers ENOSYS, for this thread and the
        threads it starts.  libuv (uvloop) batches its epoll_ctl calls through an io_uring when it can make
        one (and ignores UV_USE_IO_URING for that ring); operations submitted through a ring are not system
        calls, so no filter would see them, and the ring is a large kernel surface.  Without one, libuv
        calls epoll_ctl.  Call it before the event loop exists."""
        from evmm.confine._seccomp_ffi import ffi, lib

        prog = assemble(compile_filter([Rule("io_uring_setup", errno=errno.ENOSYS)], SECCOMP_RET_ALLOW))
        ret = lib.evmm_seccomp_install(ffi.from_buffer(prog), len(prog) // 8, b"main")
        if ret < 0:
            raise EvmmError(f"seccomp: cannot install the io_uring filter: {os.strerror(-ret)}")

    def unconfined_threads(self) -> list[str]:
        """Threads of this process (``/proc/self/task``) without a filter of ours, as ``tid (name)``.

        The kernel's own workers listed there are not ours to filter: they run no user code (vhost's
        ``vhost-PID`` since Linux 6.4, KVM's ``kvm-nx-lpage-recovery`` since 6.13, both PF_USER_WORKER).
        """
        out = []
        for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
            with self._lock:
                known = tid in self.confined
            if not known:
                try:
                    name = open(f"/proc/self/task/{tid}/comm").read().strip()  # noqa: SIM115
                    stat = open(f"/proc/self/task/{tid}/stat").read()  # noqa: SIM115
                except OSError:
                    continue  # it has exited
                if kernel_worker(stat):
                    continue
                out.append(f"{tid} ({name})")
        return out


PF_USER_WORKER = 0x00004000  # include/linux/sched.h: a kernel worker living in a user process
PF_KTHREAD = 0x00200000


def kernel_worker(stat: str) -> bool:
    """Whether a /proc/PID/task/TID/stat line is a kernel worker's (proc(5): flags, the ninth field, counted
    after the parenthesised name, which may hold spaces)."""
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        flags = int(fields[6])
    except (IndexError, ValueError):
        return False
    return bool(flags & (PF_USER_WORKER | PF_KTHREAD))


def check_kernel(mode: Mode) -> None:
    """Refuse to start when the kernel cannot filter: one line, before anything runs."""
    # proc(5): the Seccomp field exists where the kernel has CONFIG_SECCOMP, as prctl(PR_GET_SECCOMP) does;
    # read here rather than asked through ctypes, which a VMM would otherwise load for this one call.
    try:
        with open("/proc/self/status") as status:
            present = any(line.startswith("Seccomp:") for line in status)
    except OSError as e:
        raise EvmmError(f"--seccomp {mode.value}: cannot read /proc/self/status: {e.strerror}") from None
    if not present:
        raise EvmmError(
            f"--seccomp {mode.value}: this kernel has no seccomp filters (no Seccomp field in "
            "/proc/self/status); use --seccomp off to run unconfined"
        )


def enable(mode: Mode, features: Features) -> Confinement | None:
    """Compile the filters for this process and arm the SIGSYS handler; threads started from now on confine
    themselves.  ``off`` disables confinement.  Called once, by ``evmm run``, before any evmm thread starts."""
    if mode is Mode.OFF:
        set_active(None)
        return None
    check_kernel(mode)
    try:
        from evmm.confine._seccomp_ffi import lib
    except ImportError:
        raise EvmmError(
            "evmm's seccomp module is not compiled: reinstall with `pip install -e .` "
            "(or run with --seccomp off)"
        ) from None
    for name, nr in NUMBERS.items():
        lib.evmm_seccomp_name_syscall(nr, name.encode())
    if mode is Mode.KILL:
        ret = lib.evmm_seccomp_handle_sigsys(EXIT_SECCOMP)
        if ret < 0:
            raise EvmmError(f"seccomp: cannot handle SIGSYS: {os.strerror(-ret)}")
    confinement = Confinement(mode, features)
    confinement.refuse_io_uring()
    set_active(confinement)
    return confinement


def confine_main(stop: Callable[[int, str], None]) -> None:
    """Confine the main thread (the reactor): call it once the vCPU threads are started, before the reactor
    serves them.  Every other thread must wear its filter first (they put it on as they start); one that
    does not within ``THREAD_WAIT`` stops the machine, so no thread ever serves the guest unconfined."""
    confinement = active()
    if confinement is None:
        return
    me = threading.get_native_id()
    deadline = time.monotonic() + THREAD_WAIT
    while (left := [t for t in confinement.unconfined_threads() if not t.startswith(f"{me} ")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.001)
    if left:
        stop(EXIT_SECCOMP, f"seccomp: thread {', '.join(left)} runs without a filter (an evmm bug)")
        return
    try:
        confinement.install("main")
    except EvmmError as e:
        stop(EXIT_SECCOMP, str(e))


def features(config: MachineConfig) -> Features:
    """What of the machine widens the lists: taps (now or hot-replaced later), vhost-vsock, vhost-net, shared
    directories, PCI."""
    return Features(
        # The standard board adds NICs at run time (device-add), each on a tap it opens then.
        tap=bool(config.nets) or config.hotplug_net > 0 or config.board == "standard",
        vhost=config.vsock is not None and config.vsock.vhost,
        vhost_net=_may_use_vhost_net(config),
        fs=bool(config.fss),
        pci=config.board == "standard",
    )


def _may_use_vhost_net(config: MachineConfig) -> bool:
    """A NIC or net slot on vhost-net: asked for (vhost=on), or not refused where /dev/vhost-net exists.  The
    device is opened at build (VHOST_SET_OWNER, before any filter), but the guest's DRIVER_OK, a reset and a
    hot-replace come later, on the filtered main thread."""
    wants = [n.vhost for n in config.nets]
    if config.hotplug_net > 0:
        wants.append(config.hotplug_vhost)
    if True in wants:
        return True
    if None not in wants:
        return False
    from evmm.vhost.net import VHOST_NET_PATH

    return os.path.exists(VHOST_NET_PATH)


def main_on_start(machine: StartingMachine) -> Callable[[str, dict[str, Any]], None]:
    """A machine-event listener that confines the main thread when the machine says it runs (it says so on
    the reactor, right after starting the vCPU threads and before serving any of their exits)."""
    done = False

    def listener(event: str, data: dict[str, Any]) -> None:
        nonlocal done
        if not done and event == "state-changed" and data.get("state") == "running":
            done = True
            confine_main(machine.stop)

    return listener
