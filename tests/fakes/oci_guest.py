"""A fake microVM for evmm-oci's monitor: the ``GuestFactory`` protocol (evmm/oci/guest.py) over host processes.

Selected with ``EVMM_OCI_GUEST=tests.fakes.oci_guest:FakeGuestFactory``.  A "guest process" is the request's
argv run on this host (pipes, or a pty with the requested size), so the monitor's relaying, signals, exit
statuses and terminal handling are exercised for real without a VM.  The "VMM" is a ``sleep`` child that dies
with the monitor (PR_SET_PDEATHSIG); killing it is the VM crashing.  ``FAKE_OCI_BOOT_FAIL=message`` makes the
boot fail.  Nothing of a container's rootfs, mounts or namespaces is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import AsyncIterator

from evmm.errors import EvmmError
from evmm.oci.console import set_window_size
from evmm.oci.guest import STDERR, STDOUT, ExitStatus, ProcessRequest, VmPlan

_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _prctl(1, signal.SIGKILL, 0, 0, 0)


class FakeProcess:
    def __init__(self, request: ProcessRequest) -> None:
        self.request = request
        self._queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.master: int | None = None
        if request.tty:
            self.master, slave = os.openpty()
            set_window_size(slave, request.rows, request.cols)
            self.proc = subprocess.Popen(
                list(request.argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=_env(request),
                start_new_session=True,
                preexec_fn=_controlling_tty,
            )
            os.close(slave)
            os.set_blocking(self.master, False)
            self._open = 1
            asyncio.get_running_loop().add_reader(self.master, self._read_pty)
        else:
            self.proc = subprocess.Popen(
                list(request.argv),
                stdin=subprocess.PIPE if request.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if request.merge_stderr else subprocess.PIPE,
                env=_env(request),
                start_new_session=True,
            )
            pipes = [(STDOUT, self.proc.stdout)]
            if not request.merge_stderr:
                pipes.append((STDERR, self.proc.stderr))
            self._open = len(pipes)
            loop = asyncio.get_running_loop()
            for stream, pipe in pipes:
                assert pipe is not None
                os.set_blocking(pipe.fileno(), False)
                loop.add_reader(pipe.fileno(), self._read_pipe, stream, pipe.fileno())

    def _closed(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._queue.put_nowait(None)

    def _read_pipe(self, stream: int, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            self._queue.put_nowait((stream, data))
        else:
            asyncio.get_running_loop().remove_reader(fd)
            self._closed()

    def _read_pty(self) -> None:
        assert self.master is not None
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._queue.put_nowait((STDOUT, data))
        else:
            asyncio.get_running_loop().remove_reader(self.master)
            self._closed()

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def write(self, data: bytes) -> None:
        if self.master is not None:
            os.write(self.master, data)
        elif self.proc.stdin is not None:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    async def close_stdin(self) -> None:
        if self.master is not None:
            os.write(self.master, b"\x04")
        elif self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    async def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)

    async def resize(self, rows: int, cols: int) -> None:
        if self.master is not None:
            set_window_size(self.master, rows, cols)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGWINCH)

    async def wait(self) -> ExitStatus:
        while (code := self.proc.poll()) is None:
            await asyncio.sleep(0.02)
        return ExitStatus(128 - code, -code) if code < 0 else ExitStatus(code)


def _env(request: ProcessRequest) -> dict[str, str]:
    env = dict(item.partition("=")[::2] for item in request.env)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def _controlling_tty() -> None:
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class FakeGuest:
    def __init__(self, plan: VmPlan) -> None:
        self.plan = plan
        self.vmm = subprocess.Popen(
            ["sleep", "1000000"], preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL, close_fds=True
        )
        self.vmm_pid = self.vmm.pid
        self.processes: list[FakeProcess] = []

    async def exec(self, request: ProcessRequest) -> FakeProcess:
        try:
            proc = FakeProcess(request)
        except OSError as e:
            raise EvmmError(f"exec {request.argv[0]}: {e.strerror}") from None
        self.processes.append(proc)
        return proc

    async def pause(self) -> None:
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGSTOP)

    async def resume(self) -> None:
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError):
                p.proc.send_signal(signal.SIGCONT)

    async def stopped(self) -> str:
        while (code := self.vmm.poll()) is None:
            await asyncio.sleep(0.05)
        return f"the VMM exited ({code})"

    async def close(self) -> None:
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
            p.proc.wait()
        if self.vmm.poll() is None:
            self.vmm.kill()
        self.vmm.wait()


class FakeGuestFactory:
    async def boot(self, plan: VmPlan) -> FakeGuest:
        why = os.environ.get("FAKE_OCI_BOOT_FAIL")
        if why:
            raise EvmmError(why)
        return FakeGuest(plan)
