"""A process running in the guest, seen from the host: its output streams, its stdin, its exit.

Flow control (docs/agent-protocol.md, "Flow control"): the agent sends at most ``window`` bytes of a stream
before the host grants more with ``credit``; a stream grants what its reader has taken once that reaches half
the window, so what waits here is never more than one window per stream, and a reader that stops slows the
process down.  Stdin writes are answered once the bytes are in the process's pipe; ``StdinWriter`` keeps at
most ``STDIN_WINDOW`` bytes unanswered.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from evmm.errors import EvmmError
from evmm.record import record

DEFAULT_WINDOW = 256 << 10  # the agent's default; exec(window=) changes it
MAX_CHUNK = 256 << 10  # bytes per stdin write request (the agent's MAX_CHUNK)
STDIN_WINDOW = 1 << 20  # unanswered stdin bytes per process


@record(frozen=True)
class ExitStatus:
    code: int | None  # the exit code, or None when a signal ended the process
    signal: int | None
    core_dumped: bool = False

    @property
    def returncode(self) -> int:
        """As a shell reports it: the code, or 128 + the signal's number."""
        return self.code if self.code is not None else 128 + (self.signal or 0)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ExitStatus:
        code, sig = data.get("code"), data.get("signal")
        return cls(
            code if isinstance(code, int) else None,
            sig if isinstance(sig, int) else None,
            bool(data.get("core_dumped", False)),
        )


@record(frozen=True)
class ExecResult:
    """What ``Sandbox.run`` returns: the whole output and how the process ended."""

    exit_code: int | None  # None when a signal ended it
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def returncode(self) -> int:
        return self.exit_code if self.exit_code is not None else 128 + (self.signal or 0)


Sender = Callable[[str, Mapping[str, Any]], "asyncio.Future[Any]"]


class OutputStream:
    """stdout or stderr: ``async for chunk in stream``, or ``await stream.read()`` for all of it."""

    def __init__(self, name: str, window: int, grant: Callable[[str, int], None]) -> None:
        self.name = name
        self._window = window
        self._grant = grant
        self._chunks: collections.deque[bytes] = collections.deque()
        self._ready = asyncio.Event()
        self._ended = False
        self._error: str | None = None
        self._taken = 0  # bytes read and not yet granted back
        self.buffered = 0

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.buffered += len(data)
        self._ready.set()

    def _end(self, error: str | None = None) -> None:
        self._ended = True
        self._error = self._error or error
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while (chunk := await self.read_chunk()) is not None:
            yield chunk

    async def read_chunk(self) -> bytes | None:
        """The next chunk as the agent sent it, or None at the end of the stream."""
        while not self._chunks:
            if self._ended:
                if self._error is not None:
                    raise EvmmError(f"{self.name}: {self._error}")
                return None
            self._ready.clear()
            await self._ready.wait()
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        self._taken += len(chunk)
        if self._taken >= self._window // 2 and not self._ended:
            self._grant(self.name, self._taken)
            self._taken = 0
        return chunk

    async def read(self) -> bytes:
        """Everything until the process ends."""
        return b"".join([chunk async for chunk in self])


class StdinWriter:
    """The process's stdin: ``await write(data)`` returns once at most ``STDIN_WINDOW`` bytes are unanswered;
    ``await close()`` when everything is written, then ends the input (EOF; ^D on a terminal)."""

    def __init__(self, pid: int, send: Sender) -> None:
        self.pid = pid
        self._send = send
        self._unanswered: collections.deque[tuple[int, asyncio.Future[Any]]] = collections.deque()
        self._bytes = 0
        self.closed = False

    async def _settle(self, limit: int) -> None:
        while self._unanswered and self._bytes > limit:
            n, fut = self._unanswered.popleft()
            self._bytes -= n
            await fut  # an error here is the agent's answer: the process closed its input, or exited

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise EvmmError(f"stdin of process {self.pid} is closed")
        view = memoryview(data)
        for start in range(0, len(view), MAX_CHUNK):
            piece = bytes(view[start : start + MAX_CHUNK])
            self._unanswered.append((len(piece), self._send("stdin", {"pid": self.pid, "data": piece})))
            self._bytes += len(piece)
            await self._settle(STDIN_WINDOW)

    async def drain(self) -> None:
        """Wait until everything written is in the process's pipe."""
        await self._settle(-1)

    async def close(self) -> None:
        if self.closed:
            return
        await self.drain()
        self.closed = True
        await self._send("stdin-close", {"pid": self.pid})


class Process:
    """A process started by ``exec``: ``pid`` in the guest, ``stdout``/``stderr`` (with a terminal, all of
    its output is on ``stdout``), ``stdin`` when started with ``stdin=True``."""

    def __init__(self, pid: int, *, send: Sender, stdin: bool, window: int = DEFAULT_WINDOW) -> None:
        self.pid = pid
        self._send = send
        self.stdout = OutputStream("stdout", window, self._grant)
        self.stderr = OutputStream("stderr", window, self._grant)
        self.stdin = StdinWriter(pid, send) if stdin else None
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()

    def _grant(self, stream: str, taken: int) -> None:
        fut = self._send("credit", {"pid": self.pid, "stream": stream, "bytes": taken})
        fut.add_done_callback(lambda f: f.exception())  # a process that exited meanwhile: nothing to do

    # ---- fed by the client -----------------------------------------------------------------------------

    def _on_output(self, stream: str, data: bytes) -> None:
        (self.stderr if stream == "stderr" else self.stdout)._feed(data)

    def _on_exit(self, status: ExitStatus) -> None:
        self.stdout._end()
        self.stderr._end()
        if not self._exit.done():
            self._exit.set_result(status)

    def _on_lost(self, reason: str) -> None:
        self.stdout._end(reason)
        self.stderr._end(reason)
        if not self._exit.done():
            self._exit.set_exception(EvmmError(f"process {self.pid}: {reason}"))
            self._exit.add_done_callback(lambda f: f.exception())

    # ---- API -------------------------------------------------------------------------------------------

    @property
    def status(self) -> ExitStatus | None:
        """How it ended, once it has; None while it runs."""
        return self._exit.result() if self._exit.done() and not self._exit.exception() else None

    async def wait(self) -> ExitStatus:
        """Wait for the exit (its output must be read, or it may block writing once a window is full)."""
        return await asyncio.shield(self._exit)

    async def signal(self, sig: int | str, *, group: bool = False) -> None:
        """Send a signal (a number or a name such as "TERM"); ``group``: to its whole process group."""
        await self._send("signal", {"pid": self.pid, "signal": sig, "group": group})

    async def kill(self) -> None:
        await self.signal("KILL", group=True)

    async def resize(self, rows: int, cols: int) -> None:
        """A new terminal size (a process started with ``tty=True``); it gets SIGWINCH."""
        await self._send("resize", {"pid": self.pid, "rows": rows, "cols": cols})
