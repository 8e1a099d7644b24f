"""``create`` and ``exec``: fork the monitor that stands for the container (or the exec'd process), wait until
it is ready, write ``--pid-file``, and leave it running for the caller to inherit and wait on.

The monitor reports over a pipe: ``ok`` once the container is ``created`` (or the exec'd process started),
otherwise one line saying why not; a monitor that dies first closes the pipe and says nothing.  Its stdio is
the caller's (the container's stdio) or a pty sent to ``--console-socket``; its own 0, 1 and 2 point at
/dev/null so that nothing of evmm's (nor the VMM it starts) ever writes into the container's streams.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from evmm.errors import EvmmError
from evmm.oci import cgroups, console, network, plan
from evmm.oci.execmon import RemoteProcess
from evmm.oci.guest import ExitStatus, ProcessRequest, VmPlan, load_factory
from evmm.oci.hostio import HostStdio, background, is_dev_null
from evmm.oci.monitor import ContainerMonitor
from evmm.oci.runlog import RuntimeLog
from evmm.oci.spec import ContainerSpec
from evmm.oci.state import Record, Store
from evmm.record import record

CONSOLE_LOG = "console.log"  # in the container's state directory: why a VM that died, died


@record(frozen=True)
class RuntimeOptions:
    """evmm-oci's global options that shape a container: its cgroup path's syntax, its guest's images."""

    systemd_cgroup: bool = False
    kernel: Path | None = None
    initrd: Path | None = None


DEFAULTS = RuntimeOptions()


def die_with(status: ExitStatus) -> None:
    """Exit as the container's process did: with its code, or killed by the same signal (runc's init does)."""
    sys.stdout.flush()
    if status.signal is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSEGV & co. would otherwise dump our core
        if status.signal not in (signal.SIGKILL, signal.SIGSTOP):  # these two have no handler to reset
            signal.signal(status.signal, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {status.signal})
        os.kill(os.getpid(), status.signal)
    os._exit(status.code & 0xFF)


def write_pid_file(path: str, pid: int) -> None:
    """Atomically, as runc does: engines poll for the file and must never read it half written."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(str(pid))
    os.replace(tmp, target)


def _quiet_stdio() -> tuple[int, int, int]:
    """Our 0, 1, 2 moved to private fds (returned), /dev/null in their place."""
    saved = tuple(os.dup(fd) for fd in (0, 1, 2))
    for fd in saved:
        os.set_inheritable(fd, False)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return saved  # type: ignore[return-value]


def _host_stdio(console_socket: str | None, tty: bool) -> HostStdio:
    """The process's stdio: a pty sent to the caller, or the caller's own fds."""
    if tty:
        if console_socket is None:
            raise EvmmError("process.terminal is true but no --console-socket was given")
        master, slave, name = console.open_pty()
        try:
            console.send_master(console_socket, master, name)
        finally:
            os.close(master)
        try:
            console.take_controlling_terminal(slave)  # for SIGWINCH on resizes: needs a session of our own
        except OSError:
            pass  # `evmm-oci exec -t` in the caller's session: the size is sent once, at the start
        _quiet_stdio()
        return HostStdio(slave, slave, slave)
    stdin_null = is_dev_null(0)
    fd_in, fd_out, fd_err = _quiet_stdio()
    if stdin_null:
        os.close(fd_in)
    return HostStdio(None if stdin_null else fd_in, fd_out, fd_err)


def fork_monitor(body: Callable[[int], None], what: str) -> int:
    """Fork a monitor running ``body(ready_fd)`` in a session of its own; its pid once it says ``ok``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the monitor
        os.close(r)
        try:
            os.setsid()
            body(w)
        except BaseException as e:  # the parent reports it; nothing here may print to the caller's fds
            try:
                os.write(w, f"{e}".encode()[:4000] or b"the monitor failed")
            except OSError:
                pass
        os._exit(255)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    message = b"".join(chunks).decode(errors="replace").strip()
    if message == "ok":
        return pid
    os.waitpid(pid, 0)
    raise EvmmError(message or f"the {what} monitor died before it was ready (see the --log file)")


def _ready(fd: int) -> None:
    os.write(fd, b"ok")
    os.close(fd)


def create(
    store: Store,
    log: RuntimeLog,
    rec: Record,
    spec: ContainerSpec,
    *,
    console_socket: str | None,
    pid_file: str | None,
    options: RuntimeOptions = DEFAULTS,
) -> int:
    """Create the container; the monitor's pid.  On failure its state directory is gone again."""
    store.create(rec)

    def body(ready_fd: int) -> None:
        status = asyncio.run(_monitor(store, log, rec, spec, console_socket, options, ready_fd))
        die_with(status)

    try:
        pid = fork_monitor(body, "container")
        if pid_file:
            write_pid_file(pid_file, pid)
    except BaseException:
        store.remove(rec.id)
        raise
    return pid


async def _monitor(
    store: Store,
    log: RuntimeLog,
    rec: Record,
    spec: ContainerSpec,
    console_socket: str | None,
    options: RuntimeOptions,
    ready_fd: int,
) -> ExitStatus:
    assert spec.process is not None
    stdio = _host_stdio(console_socket, spec.process.terminal)
    netns = spec.namespace("network")
    network.enter(netns.path if netns else None)
    rec = replace(rec, netns=netns.path if netns and netns.path else f"/proc/{os.getpid()}/ns/net")
    if spec.cpuset:  # linux.resources.cpu.cpus: the VM's threads run there (the VMM inherits it)
        os.sched_setaffinity(0, spec.cpuset)
    if spec.cgroups_path:
        where = cgroups.cgroup_dir(spec.cgroups_path, options.systemd_cgroup, rec.id)
        weight = cgroups.shares_to_weight(spec.cpu_weight) if spec.cpu_weight else None
        cgroups.join(where, os.getpid(), weight)
        rec = replace(rec, cgroup=str(where))
    vm, mounts = plan.vm_plan(spec, kernel=options.kernel, initrd=options.initrd)
    vm = replace(vm, console_log=store.dir(rec.id) / CONSOLE_LOG)
    first = plan.first_process(spec, mounts, stdin=stdio.stdin is not None)
    first = replace(first, merge_stderr=stdio.shared_output and not first.tty)
    monitor = ContainerMonitor(store, rec, spec, vm, first, stdio, log, load_factory())
    monitor.prepare = lambda: _network(monitor, vm)
    try:
        await monitor.create()
    except BaseException:
        await monitor.abort()
        raise
    _ready(ready_fd)
    status = await monitor.run()
    monitor.finish(status)
    return status


def _network(monitor: ContainerMonitor, vm: VmPlan) -> Awaitable[VmPlan]:
    """After the hooks (docker's moves the veth in): the tap joined to the veth, the guest's NIC planned."""

    async def plumb() -> VmPlan:
        interfaces, routes = network.discover()
        if not interfaces:
            return vm  # no veth (--network none, ctr's default): the VM gets no NIC
        if len(interfaces) > 1:
            names = ", ".join(i.name for i in interfaces)
            raise EvmmError(
                f"the network namespace has {len(interfaces)} interfaces ({names}); evmm-oci carries one"
            )
        veth = interfaces[0]
        network.plumb(veth)
        monitor.rec = replace(monitor.rec, veth=veth.name)
        setup = tuple(tuple(c) for c in network.guest_commands(veth, routes))
        return replace(vm, tap=network.TAP, mac=veth.mac, guest_setup=setup + vm.guest_setup)

    return plumb()


def exec_process(
    store: Store,
    log: RuntimeLog,
    container_id: str,
    request: ProcessRequest,
    *,
    console_socket: str | None,
    pid_file: str | None,
    detach: bool,
) -> int:
    """``exec``: with ``detach``, fork an exec monitor and return 0 once its process runs; without, this
    process is the exec monitor and returns (or dies) with the exec'd process's status."""
    socket = store.socket(container_id)

    async def relay(ready: Callable[[], None]) -> ExitStatus:
        stdio = _host_stdio(console_socket, request.tty)
        req = replace(
            request,
            stdin=request.stdin and stdio.stdin is not None,
            merge_stderr=stdio.shared_output and not request.tty,
        )
        if req.tty:
            rows, cols = console.window_size(stdio.stdout)
            if rows and cols:
                req = replace(req, rows=rows, cols=cols)
        proc = await RemoteProcess.start(socket, req, os.getpid())
        ready()
        loop = asyncio.get_running_loop()
        from evmm.oci.monitor import FORWARDED

        def forward(signum: int) -> None:
            background(proc.signal(signum))

        def resize() -> None:
            background(proc.resize(*console.window_size(stdio.stdout)))

        for s in FORWARDED:
            loop.add_signal_handler(s, forward, s)
        if req.tty:
            loop.add_signal_handler(signal.SIGWINCH, resize)
        out = asyncio.ensure_future(stdio.pump_out(proc))
        inp = asyncio.ensure_future(stdio.pump_in(proc))
        try:
            status = await proc.wait()
            await out
        except EvmmError as e:
            log.error(str(e), stderr=False)
            status = ExitStatus(255)
        finally:
            inp.cancel()
            stdio.restore()
            await proc.close()
        return status

    if detach:

        def body(ready_fd: int) -> None:
            die_with(asyncio.run(relay(lambda: _ready(ready_fd))))

        pid = fork_monitor(body, "exec")
        if pid_file:
            write_pid_file(pid_file, pid)
        return 0
    if pid_file:
        write_pid_file(pid_file, os.getpid())
    die_with(asyncio.run(relay(lambda: None)))
    return 0  # not reached
