"""The container's stdio on the host: the caller's fds (pipes, files, /dev/null) or a pty, relayed to and from a
guest process on the reactor.

One task copies the guest's output to the host in the order the guest produced it (stdout and stderr
interleaved as they came, so engines' logs keep the order), waiting for a slow reader instead of buffering
without bound (the agent's window then slows the process).  Another copies the host's stdin in, closing the
guest's stdin at end of file.  Regular files cannot be polled (epoll refuses them) but never block, so they
are read and written directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Awaitable
from typing import Any

from evmm.oci.guest import STDERR, GuestProcess

CHUNK = 1 << 16
DEV_NULL = os.makedev(1, 3)


_background: set[asyncio.Future[Any]] = set()


def background(call: Awaitable[Any]) -> None:
    """Fire and forget a call into the guest (a signal, a resize): its failure is dropped, since the process
    it was for may well be gone by then."""
    fut = asyncio.ensure_future(call)
    _background.add(fut)
    fut.add_done_callback(_background.discard)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _pollable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def is_dev_null(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return True  # closed: nothing to read either
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == DEV_NULL


class _Nonblocking:
    """O_NONBLOCK on an fd for as long as we use it; the caller's flags come back at ``restore``."""

    def __init__(self) -> None:
        self._saved: dict[int, bool] = {}

    def set(self, fd: int) -> None:
        if fd not in self._saved:
            self._saved[fd] = os.get_blocking(fd)
            os.set_blocking(fd, False)

    def restore(self) -> None:
        for fd, blocking in self._saved.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
        self._saved.clear()


async def _ready(fd: int, writing: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writing else (loop.add_reader, loop.remove_reader)

    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, done)
    try:
        await fut
    finally:
        remove(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a non-blocking (or never-blocking) fd, waiting while it is full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, writing=True)
            continue
        view = view[n:]


async def read_some(fd: int) -> bytes:
    """Up to CHUNK bytes, b"" at end of file (EIO on a pty whose other side closed is end of file too)."""
    while True:
        try:
            return os.read(fd, CHUNK)
        except BlockingIOError:
            await _ready(fd, writing=False)
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise


class HostStdio:
    """Where a container process's stdio goes on the host: ``stdin``/``stdout``/``stderr`` fds (the same pty
    slave for all three with a terminal)."""

    def __init__(self, stdin: int | None, stdout: int, stderr: int) -> None:
        self.stdin = stdin  # None: the process gets no stdin (its stdin is at end of file)
        self.stdout = stdout
        self.stderr = stderr
        self._flags = _Nonblocking()
        for fd in {stdout, stderr, *(() if stdin is None else (stdin,))}:
            if _pollable(fd):
                self._flags.set(fd)

    @property
    def shared_output(self) -> bool:
        """stdout and stderr are the same pipe, file or terminal (``2>&1``)."""
        if self.stdout == self.stderr:
            return True
        try:
            a, b = os.fstat(self.stdout), os.fstat(self.stderr)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    async def pump_out(self, proc: GuestProcess) -> None:
        async for stream, data in proc.output():
            try:
                await write_all(self.stderr if stream == STDERR else self.stdout, data)
            except OSError:
                pass  # the reader went away: the process goes on, as with a closed pipe it would get EPIPE

    async def pump_in(self, proc: GuestProcess) -> None:
        if self.stdin is None:
            return
        try:
            while data := await read_some(self.stdin):
                await proc.write(data)
        except OSError:
            pass
        await proc.close_stdin()

    def restore(self) -> None:
        self._flags.restore()
