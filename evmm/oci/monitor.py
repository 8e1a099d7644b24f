"""The container monitor: the host process whose pid evmm-oci writes to ``--pid-file``.

As runc's init is for runc, it is the container for the engine: it lives as long as the container's process,
exits with its status (killed by signal N -> dies of signal N), passes signals sent to it into the guest, and
is a child of ``evmm-oci create`` that outlives it, so the engine (a subreaper) inherits and waits on it.  It
owns the microVM: booted at ``create``, the process started at ``start``, the VM torn down when the process
ends (the VMM is its child and dies with it whatever the way: ``PR_SET_PDEATHSIG``).

It serves ``ROOT/ID/monitor.sock`` (evmm/oci/rpc.py) for evmm-oci's other commands: start, kill, pause,
resume, ps, and exec (the guest process's output streamed back as events, stdin and signals sent in).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from evmm.errors import EvmmError
from evmm.oci import hooks
from evmm.oci.guest import ExitStatus, Guest, GuestFactory, GuestProcess, ProcessRequest, VmPlan
from evmm.oci.hostio import HostStdio, background
from evmm.oci.rpc import MonitorServer, Session
from evmm.oci.runlog import RuntimeLog
from evmm.oci.spec import ContainerSpec
from evmm.oci.state import Record, Store, oci_state, start_time

# Signals the monitor passes to the container's process when they are sent to it (kill(2) on the pid in
# --pid-file).  SIGKILL and SIGSTOP cannot be caught: SIGKILL ends the monitor and so the VM, as it ends runc's
# init; SIGCHLD is the VMM's; SIGWINCH is a resize of the terminal, passed on as one.
FORWARDED = tuple(
    s
    for s in signal.valid_signals()
    if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH, signal.SIGPIPE)
    and s < signal.SIGRTMIN
)
# What a signal does to a process that has no handler for it (signal(7)): these are ignored or stop it.
NOT_FATAL = (
    signal.SIGCHLD,
    signal.SIGCONT,
    signal.SIGURG,
    signal.SIGWINCH,
    signal.SIGSTOP,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
EXEC_WINDOW = 1 << 20  # output bytes an exec client may have unacknowledged before the relay waits
OUTPUT_GRACE = 2.0  # seconds to let the last output arrive after the process's exit
VM_DIED = ExitStatus(255)
START_FAILED = ExitStatus(255)


class _Exec:
    """A process started by ``evmm-oci exec``, relayed to the exec monitor's connection."""

    def __init__(self, proc: GuestProcess, session: Session, client_pid: int) -> None:
        self.proc = proc
        self.session = session
        self.client_pid = client_pid
        self.unacked = 0
        self.credit = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class ContainerMonitor:
    def __init__(
        self,
        store: Store,
        rec: Record,
        spec: ContainerSpec,
        plan: VmPlan,
        first: ProcessRequest,
        stdio: HostStdio,
        log: RuntimeLog,
        factory: GuestFactory,
    ) -> None:
        self.store = store
        self.rec = rec
        self.spec = spec
        self.plan = plan
        self.first = first
        self.stdio = stdio
        self.log = log
        self.factory = factory
        self.guest: Guest | None = None
        self.proc: GuestProcess | None = None
        self.execs: dict[int, _Exec] = {}
        self._ids = itertools.count(1)
        self.start_requested = asyncio.Event()
        self.fatal_signal: int | None = None
        self.start_failed = False
        # Called after the create-time hooks, before the boot: the final plan (the network, once docker's
        # prestart hook has moved the veth into our namespace).
        self.prepare: Callable[[], Awaitable[VmPlan]] | None = None
        self.stop = asyncio.Event()
        self.server = MonitorServer(
            store.socket(rec.id),
            {
                "start": self._start,
                "kill": self._kill,
                "pause": self._pause,
                "resume": self._resume,
                "ps": self._ps,
                "exec": self._exec,
                "stdin": self._stdin,
                "stdin-close": self._stdin_close,
                "signal": self._signal,
                "resize": self._resize,
                "ack": self._ack,
            },
        )

    # ---- life cycle ---------------------------------------------------------------------------------------

    def _set(self, status: str, **changes: Any) -> None:
        self.rec = replace(self.rec, status=status, **changes)
        self.store.save(self.rec)

    async def create(self) -> None:
        """Boot the VM and run the create-time hooks; the container is then ``created``.  Errors: EvmmError."""
        self.rec = replace(self.rec, monitor_pid=os.getpid(), monitor_start=start_time(os.getpid()) or 0)
        self.store.save(self.rec)
        await self.server.start()
        for kind in ("prestart", "createRuntime"):
            await hooks.run_all(self.spec.hooks_of(kind), oci_state(self.rec, "creating"), kind)
        if self.prepare is not None:
            self.plan = await self.prepare()
        self.guest = await self.factory.boot(self.plan)
        self._set("created", vmm_pid=self.guest.vmm_pid, vmm_start=start_time(self.guest.vmm_pid) or 0)

    async def abort(self) -> None:
        """``create`` failed: whatever it had made goes."""
        await self._teardown()

    async def run(self) -> ExitStatus:
        """From ``created`` to the end: wait for ``start``, run the process, tear the VM down."""
        assert self.guest is not None
        loop = asyncio.get_running_loop()
        for s in FORWARDED:
            loop.add_signal_handler(s, self._on_signal, s)
        loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
        vm_gone = asyncio.ensure_future(self.guest.stopped())
        try:
            started = asyncio.ensure_future(self.start_requested.wait())
            stopping = asyncio.ensure_future(self.stop.wait())
            first: set[asyncio.Future[Any]] = {started, vm_gone, stopping}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            stopping.cancel()
            if self.fatal_signal is not None:
                return ExitStatus(128 + self.fatal_signal, self.fatal_signal)
            if self.start_failed:
                return START_FAILED
            if vm_gone.done():
                return self._vm_died(vm_gone.result())
            return await self._supervise(vm_gone)
        finally:
            vm_gone.cancel()
            await self._teardown()

    async def _supervise(self, vm_gone: asyncio.Future[str]) -> ExitStatus:
        proc = self.proc
        assert proc is not None
        out = asyncio.ensure_future(self.stdio.pump_out(proc))
        inp = asyncio.ensure_future(self.stdio.pump_in(proc))
        waiter = asyncio.ensure_future(proc.wait())
        either: set[asyncio.Future[Any]] = {waiter, vm_gone}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            out.cancel()
            inp.cancel()
            return self._vm_died(vm_gone.result())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(out), OUTPUT_GRACE)
        out.cancel()
        inp.cancel()
        return waiter.result()

    def _vm_died(self, why: str) -> ExitStatus:
        where = f" (its console: {self.plan.console_log})" if self.plan.console_log else ""
        self.log.error(f"container {self.rec.id}: the VM stopped: {why}{where}", stderr=False)
        self.rec = replace(self.rec, detail=f"the VM stopped: {why}")
        return VM_DIED

    async def _teardown(self) -> None:
        for ex in self.execs.values():
            if ex.task is not None:
                ex.task.cancel()
        if self.guest is not None:
            with contextlib.suppress(EvmmError, OSError):
                await self.guest.close()
        if self.rec.veth is not None:
            from evmm.oci import network

            network.unplumb(self.rec.veth)
        self.stdio.restore()
        await self.server.close()

    def finish(self, status: ExitStatus) -> None:
        self._set("stopped", exit_status=status.wait_status)

    # ---- signals sent to the monitor ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if self.proc is not None and self.rec.status in ("running", "paused"):
            self._forward(self.proc, signum)
        elif signum not in NOT_FATAL:
            # Not started: the signal's default action, as on runc's init waiting for `start`.
            self.fatal_signal = signum
            self.stop.set()

    def _forward(self, proc: GuestProcess, signum: int) -> None:
        background(proc.signal(signum))

    def _on_winch(self) -> None:
        from evmm.oci.console import window_size

        if self.proc is None or not self.first.tty:
            return
        with contextlib.suppress(OSError):
            rows, cols = window_size(self.stdio.stdout)
            if rows and cols:
                background(self.proc.resize(rows, cols))

    # ---- RPC handlers -------------------------------------------------------------------------------------

    async def _start(self, _s: Session, _p: dict[str, Any]) -> dict[str, Any]:
        if self.rec.status != "created":
            raise EvmmError(f"cannot start a container that is {self.rec.status}")
        assert self.guest is not None
        first = self.first
        if first.tty:
            from evmm.oci.console import window_size

            with contextlib.suppress(OSError):
                rows, cols = window_size(self.stdio.stdout)
                if rows and cols:
                    first = replace(first, rows=rows, cols=cols)
        try:
            self.proc = await self.guest.exec(first)
        except EvmmError as e:
            # As runc's: a container whose process could not start is stopped.
            self.log.error(f"container {self.rec.id}: cannot start {first.argv[0]!r}: {e}", stderr=False)
            self.start_failed = True
            self.stop.set()
            raise
        self._set("running")
        self.start_requested.set()
        for hook in self.spec.hooks_of("poststart"):
            try:
                await hooks.run_all([hook], oci_state(self.rec, "running"), "poststart")
            except EvmmError as e:  # runtime spec: a failed poststart hook is a warning
                self.log.warning(str(e))
        return {}

    async def _kill(self, _s: Session, p: dict[str, Any]) -> dict[str, Any]:
        signum = _signal_param(p)
        status = self.rec.status
        if status in ("created", "creating"):
            if signum not in NOT_FATAL:
                self.fatal_signal = signum
                self.stop.set()
            return {}
        if status == "paused" and signum == signal.SIGKILL:
            self.fatal_signal = signum  # a frozen VM cannot take it: the VM goes, as SIGKILL would have it
            self.stop.set()
            if self.proc is not None:
                self._forward(self.proc, signum)
            return {}
        if self.proc is None:
            raise EvmmError("container not running")
        self._forward(self.proc, signum)
        if p.get("all"):
            for ex in self.execs.values():
                self._forward(ex.proc, signum)
        return {}

    async def _pause(self, _s: Session, _p: dict[str, Any]) -> dict[str, Any]:
        if self.rec.status != "running":
            raise EvmmError("container not running")
        assert self.guest is not None
        await self.guest.pause()
        self._set("paused")
        return {}

    async def _resume(self, _s: Session, _p: dict[str, Any]) -> dict[str, Any]:
        if self.rec.status != "paused":
            raise EvmmError("container not paused")
        assert self.guest is not None
        await self.guest.resume()
        self._set("running")
        return {}

    async def _ps(self, _s: Session, _p: dict[str, Any]) -> dict[str, Any]:
        """The host processes standing for the container's processes: this monitor and the exec monitors."""
        return {"pids": [os.getpid(), *(ex.client_pid for ex in self.execs.values() if ex.client_pid > 0)]}

    async def _exec(self, session: Session, p: dict[str, Any]) -> dict[str, Any]:
        if self.rec.status != "running" or self.guest is None:
            raise EvmmError(
                "cannot exec in a stopped container"
                if self.rec.status == "stopped"
                else f"cannot exec in a {self.rec.status} container"
            )
        request = _process_request(p.get("process"))
        proc = await self.guest.exec(replace(request, join=True, container=None))
        exec_id = next(self._ids)
        ex = _Exec(proc, session, int(p.get("client_pid", 0)))
        self.execs[exec_id] = ex
        ex.task = asyncio.ensure_future(self._relay(exec_id, ex))
        session.on_close.append(lambda: self._drop(exec_id))
        return {"id": exec_id}

    async def _relay(self, exec_id: int, ex: _Exec) -> None:
        try:
            async for stream, data in ex.proc.output():
                ex.session.emit("output", {"id": exec_id, "stream": stream, "data": data})
                ex.unacked += len(data)
                while ex.unacked > EXEC_WINDOW:
                    ex.credit.clear()
                    await ex.credit.wait()
                await ex.session.drain()
            status = await ex.proc.wait()
            ex.session.emit("exit", {"id": exec_id, "code": status.code, "signal": status.signal})
        except EvmmError as e:
            ex.session.emit("exit", {"id": exec_id, "code": 255, "signal": None, "error": str(e)})
        finally:
            self.execs.pop(exec_id, None)

    def _drop(self, exec_id: int) -> None:
        """The exec monitor went away: its process goes too (it stood for it)."""
        ex = self.execs.pop(exec_id, None)
        if ex is not None:
            self._forward(ex.proc, signal.SIGKILL)
            if ex.task is not None:
                ex.task.cancel()

    def _the_exec(self, p: dict[str, Any]) -> _Exec:
        ex = self.execs.get(p.get("id"))  # type: ignore[arg-type]
        if ex is None:
            raise EvmmError(f"no exec'd process {p.get('id')!r}")
        return ex

    async def _stdin(self, _s: Session, p: dict[str, Any]) -> dict[str, Any]:
        data = p.get("data")
        if not isinstance(data, bytes):
            raise EvmmError("stdin: data is not binary")
        await self._the_exec(p).proc.write(data)
        return {}

    async def _stdin_close(self, _s: Session, p: dict[str, Any]) -> dict[str, Any]:
        await self._the_exec(p).proc.close_stdin()
        return {}

    async def _signal(self, _s: Session, p: dict[str, Any]) -> dict[str, Any]:
        self._forward(self._the_exec(p).proc, _signal_param(p))
        return {}

    async def _resize(self, _s: Session, p: dict[str, Any]) -> dict[str, Any]:
        rows, cols = p.get("rows"), p.get("cols")
        if not (
            isinstance(rows, int) and isinstance(cols, int) and 0 < rows < 1 << 16 and 0 < cols < 1 << 16
        ):
            raise EvmmError("resize: rows and cols must be 1 to 65535")
        await self._the_exec(p).proc.resize(rows, cols)
        return {}

    async def _ack(self, _s: Session, p: dict[str, Any]) -> dict[str, Any]:
        ex = self._the_exec(p)
        n = p.get("bytes")
        if isinstance(n, int) and n > 0:
            ex.unacked = max(0, ex.unacked - n)
            ex.credit.set()
        return {}


def _signal_param(p: dict[str, Any]) -> int:
    signum = p.get("signal")
    if not isinstance(signum, int) or isinstance(signum, bool) or signum not in signal.valid_signals():
        raise EvmmError(f"invalid signal {signum!r}")
    return signum


def _process_request(raw: Any) -> ProcessRequest:
    """An exec request's process, as ``ProcessRequest`` fields, checked."""
    if not isinstance(raw, dict):
        raise EvmmError("exec: process is not a map")
    fields = ProcessRequest.__dataclass_fields__
    unknown = sorted(k for k in raw if k not in fields)
    if unknown:
        raise EvmmError(f"exec: unknown process field {unknown[0]!r}")
    argv = raw.get("argv")
    if not isinstance(argv, list | tuple) or not argv or not all(isinstance(a, str) for a in argv):
        raise EvmmError("exec: argv is not a non-empty list of strings")
    values = dict(raw)
    for key in ("argv", "env", "groups"):
        if key in values:
            values[key] = tuple(values[key])
    if "rlimits" in values:
        values["rlimits"] = tuple(tuple(r) for r in values["rlimits"])
    try:
        return ProcessRequest(**values)
    except TypeError as e:
        raise EvmmError(f"exec: {e}") from None
