"""Host endpoints for the virtio console: given fds (the terminal), a pty, or a listening Unix socket.

Every endpoint works the same way on the reactor:

* output (``write``) never blocks: what the fd cannot take now waits in a buffer flushed when the fd is
  writable; past ``MAX_PENDING`` the oldest bytes are dropped and counted, since a reader that stopped must
  not stop the guest (Linux's hvc driver spins until the device has taken each write).
* input is pulled: the device turns ``want_input`` on while it has receive buffers, is called back when the
  endpoint is readable, and reads straight into guest memory with ``read_into``.

Socket endpoint policy: one client at a time (others wait in the accept backlog until it leaves); while
nobody is attached the newest ``DETACHED_KEEP`` bytes of output are kept and handed to the next client, so
attaching shows the recent screen (a prompt, a boot log tail) rather than nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tty
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from evmm.log import log
from evmm.unixsock import listen_unix, peer_closed

MAX_PENDING = 1 << 20  # output bytes held for a slow reader
DETACHED_KEEP = 64 * 1024  # output kept for the next socket client while nobody is attached


class ConsoleBackend(ABC):
    """A host endpoint: an optional output fd and input fd, both non-blocking, served on the reactor."""

    description = "console"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_input: Callable[[], None] = lambda: None
        self._out_fd: int | None = None
        self._in_fd: int | None = None
        self._pending = bytearray()
        self._writer_armed = False
        self._want_input = False
        self._reader_armed = False
        self._poll_handle: asyncio.Handle | None = None  # for inputs epoll refuses (regular files)
        self._pollable = True
        self.dropped = 0
        self.keep_limit = MAX_PENDING

    # ---- reactor wiring --------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[], None]) -> None:
        """Serve on ``loop``; ``on_input`` is called (on the reactor) when input may be read."""
        self._loop = loop
        self._on_input = on_input
        self._arm_writer()
        self._sync_reader()

    def want_input(self, on: bool) -> None:
        """Watch the input (the device has buffers) or leave it in the host's hands (backpressure)."""
        self._want_input = on
        self._sync_reader()

    def _sync_reader(self) -> None:
        loop = self._loop
        want = self._want_input and self._in_fd is not None and loop is not None
        if want and not self._pollable:
            if self._poll_handle is None and loop is not None:
                self._poll_handle = loop.call_soon(self._poll_file)
            return
        if want == self._reader_armed or loop is None:
            return
        assert self._in_fd is not None or not want
        if want and self._in_fd is not None:
            try:
                loop.add_reader(self._in_fd, self._readable)
            except PermissionError:
                # epoll refuses regular files and /dev/null: they are always readable, so poll them.
                self._pollable = False
                self._sync_reader()
                return
            self._reader_armed = True
        elif self._in_fd is not None:
            loop.remove_reader(self._in_fd)
            self._reader_armed = False

    def _poll_file(self) -> None:
        self._poll_handle = None
        if self._want_input and self._in_fd is not None:
            self._on_input()
            self._sync_reader()  # again while the device keeps wanting input

    def _readable(self) -> None:
        self._on_input()

    def _drop_input(self) -> None:
        """Stop watching the current input fd for good (EOF, or the client left)."""
        if self._reader_armed and self._loop is not None and self._in_fd is not None:
            self._loop.remove_reader(self._in_fd)
        self._reader_armed = False
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        self._in_fd = None

    # ---- input ---------------------------------------------------------------------------------------------

    def read_into(self, views: list[memoryview]) -> int:
        """Read input into guest buffers; 0 when there is none now (the endpoint handles its own EOF)."""
        fd = self._in_fd
        if fd is None or not views:
            return 0
        try:
            n = os.readv(fd, views)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            n = 0
        if n == 0:
            self._input_ended()
        return n

    def _input_ended(self) -> None:
        self._drop_input()

    # ---- output --------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._out_fd is not None and not self._pending:
            try:
                n = os.write(self._out_fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._output_failed()
                n = 0
            data = data[n:]
            if not data:
                return
        self._pending += data
        limit = self.keep_limit if self._out_fd is None else MAX_PENDING
        if len(self._pending) > limit:
            extra = len(self._pending) - limit
            del self._pending[:extra]
            self.dropped += extra
        self._arm_writer()

    def _arm_writer(self) -> None:
        if self._pending and self._out_fd is not None and self._loop is not None and not self._writer_armed:
            self._writer_armed = True
            self._loop.add_writer(self._out_fd, self._writable)

    def _disarm_writer(self) -> None:
        if self._writer_armed and self._loop is not None and self._out_fd is not None:
            self._loop.remove_writer(self._out_fd)
        self._writer_armed = False

    def _writable(self) -> None:
        assert self._out_fd is not None
        try:
            n = os.write(self._out_fd, self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._output_failed()
            return
        del self._pending[:n]
        if not self._pending:
            self._disarm_writer()

    def _output_failed(self) -> None:
        """The reader went away (EPIPE, EIO): output is discarded from now on."""
        self._disarm_writer()
        self.dropped += len(self._pending)
        self._pending.clear()
        self._out_fd = None
        self.keep_limit = 0

    @property
    def pending_output(self) -> int:
        return len(self._pending)

    def size(self) -> tuple[int, int] | None:
        """(cols, rows) of the endpoint's terminal, when it is one."""
        return None

    def close(self) -> None:
        self._disarm_writer()
        self._drop_input()

    @abstractmethod
    def describe(self) -> str: ...


class FdBackend(ConsoleBackend):
    """Given fds, e.g. evmm's own stdin/stdout; they are not closed, and their blocking mode is restored."""

    def __init__(self, in_fd: int | None, out_fd: int, description: str = "stdio") -> None:
        super().__init__()
        self.description = description
        self._in_fd = in_fd
        self._out_fd = out_fd
        fds = {out_fd} if in_fd is None else {in_fd, out_fd}
        self._saved_blocking = {fd: os.get_blocking(fd) for fd in fds}
        for fd in fds:
            os.set_blocking(fd, False)

    def size(self) -> tuple[int, int] | None:
        for fd in (self._out_fd, self._in_fd):
            if fd is not None and os.isatty(fd):
                with contextlib.suppress(OSError):
                    sz = os.get_terminal_size(fd)
                    return (sz.columns, sz.lines)
        return None

    def describe(self) -> str:
        return self.description

    def close(self) -> None:
        # Best effort: the guest's last words reach the terminal before evmm exits.
        if self._pending and self._out_fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(self._out_fd, True)
                os.write(self._out_fd, self._pending)
            self._pending.clear()
        super().close()
        for fd, blocking in self._saved_blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)


class PtyBackend(ConsoleBackend):
    """A new pseudo-terminal: the guest's console is the master side; users open ``pty_path``.

    evmm keeps the slave open itself, so the master never reads EIO while no user has it open, and sets it
    raw: echo and line editing are the guest tty's job, not the host pty's.
    """

    def __init__(self) -> None:
        super().__init__()
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master = master
        self._slave = slave
        self.pty_path = os.ttyname(slave)
        self._in_fd = master
        self._out_fd = master

    def describe(self) -> str:
        return f"pty {self.pty_path}"

    def close(self) -> None:
        super().close()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class SocketBackend(ConsoleBackend):
    """A listening Unix socket; one client at a time is the console."""

    def __init__(self, path: Path, option: str = "--virtio-console") -> None:
        super().__init__()
        self.path = path
        self._listener = listen_unix(path, option)
        self._client: socket.socket | None = None
        self._accepting = False
        self._closed = False
        self.keep_limit = DETACHED_KEEP

    @property
    def attached(self) -> bool:
        return self._client is not None

    def start(self, loop: asyncio.AbstractEventLoop, on_input: Callable[[], None]) -> None:
        super().start(loop, on_input)
        self._sync_accepting()

    def _sync_accepting(self) -> None:
        want = not self._closed and self._client is None and self._loop is not None
        if want == self._accepting or self._loop is None:
            return
        self._accepting = want
        if want:
            self._loop.add_reader(self._listener.fileno(), self._accept)
        else:
            self._loop.remove_reader(self._listener.fileno())

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("virtio-console: accept on %s failed: %s", self.path, e)
            return
        client.setblocking(False)
        self._client = client
        self._in_fd = client.fileno()
        self._out_fd = client.fileno()
        self.keep_limit = MAX_PENDING
        self._sync_accepting()
        self._sync_reader()
        self._arm_writer()  # what was kept while detached goes to the new client first

    def _detach(self) -> None:
        self._disarm_writer()
        self._drop_input()
        if self._client is not None:
            self._client.close()
            self._client = None
        self._out_fd = None
        self.keep_limit = DETACHED_KEEP
        if len(self._pending) > DETACHED_KEEP:
            del self._pending[: len(self._pending) - DETACHED_KEEP]
        self._sync_accepting()

    def _input_ended(self) -> None:
        # EOF: a client that closed leaves; one that only shut its sending side keeps receiving output.
        if self._client is not None and peer_closed(self._client):
            self._detach()
        else:
            self._drop_input()

    def _output_failed(self) -> None:
        self._detach()

    def describe(self) -> str:
        return f"socket {self.path}"

    def close(self) -> None:
        self._closed = True
        self._detach()  # and stops accepting
        self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


__all__ = ["DETACHED_KEEP", "MAX_PENDING", "ConsoleBackend", "FdBackend", "PtyBackend", "SocketBackend"]
