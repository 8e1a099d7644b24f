"""``evmm.control.Client``: the asyncio client of the msgpack control socket.

    async with Client("/run/vm.sock") as c:
        await c.call("pause")
        await c.subscribe()
        async for ev in c.events():
            print(ev.event, ev.data)

One reader task routes responses to the calls waiting for them (matched by id) and events to a queue, so
calls may overlap and events never block answers.  Every failure is one ``EvmmError`` line: ``ControlError``
(with the server's ``code``) for an error response, plain ``EvmmError`` for a socket that is missing or
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from evmm.errors import EvmmError
from evmm.rpc.protocol import (
    Decoder,
    Event,
    ProtocolError,
    Response,
    encode_frame,
    parse_server_message,
    request,
)

CONSOLE_OUTPUT = "console-output"


class ControlError(EvmmError):
    """The VMM answered a request with an error."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(message)
        self.method = method
        self.code = code


class Client:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._console: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._background: set[asyncio.Future[Any]] = set()
        self.closed_reason: str | None = None

    # ---- connection ---------------------------------------------------------------------------------------

    async def connect(self) -> Client:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(str(self.path))
        except FileNotFoundError:
            raise EvmmError(
                f"{self.path}: no control socket there (is the VM running with --api-sock?)"
            ) from None
        except ConnectionRefusedError:
            raise EvmmError(f"{self.path}: nothing is listening (the VM has exited)") from None
        except OSError as e:
            raise EvmmError(f"{self.path}: cannot connect: {e.strerror or e}") from None
        self._task = asyncio.create_task(self._read_loop(self._reader))
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(self.closed_reason or "the client was closed")

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = Decoder()
        reason = "the VMM closed the control connection"
        try:
            while data := await reader.read(1 << 16):
                for item in decoder.feed(data):
                    if isinstance(item, ProtocolError):
                        reason = f"the VMM sent a bad frame: {item.message}"
                        return
                    try:
                        self._dispatch(parse_server_message(item))
                    except ProtocolError as e:
                        reason = f"the VMM sent a bad message: {e.message}"
                        return
        except (OSError, ConnectionError) as e:
            reason = f"control connection lost: {e}"
        finally:
            self.closed_reason = reason
            self._fail_all(reason)

    def _dispatch(self, message: Response | Event) -> None:
        if isinstance(message, Event):
            if message.event == CONSOLE_OUTPUT:
                data = message.data.get("data")
                if isinstance(data, bytes):
                    self._console.put_nowait(data)
            else:
                self._events.put_nowait(message)
            return
        if message.id is None and message.error is not None:
            # An error the server could not tie to a request (a broken frame of ours, too many clients).
            self.closed_reason = message.error.message
            return
        waiting = self._pending.pop(message.id, None) if isinstance(message.id, int) else None
        if waiting is None:
            return
        method, fut = waiting
        if fut.done():
            return
        if message.error is not None:
            fut.set_exception(ControlError(method, message.error.code, message.error.message))
        else:
            fut.set_result(message.result)

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for method, fut in pending.values():
            if not fut.done():
                fut.set_exception(EvmmError(f"{method}: {reason}"))
        self._events.put_nowait(None)
        self._console.put_nowait(None)

    # ---- requests -----------------------------------------------------------------------------------------

    def _send(self, method: str, params: Mapping[str, Any] | None) -> asyncio.Future[Any]:
        if self._writer is None or not self.connected:
            raise EvmmError(f"{method}: {self.closed_reason or 'not connected'}")
        id = next(self._ids)
        try:
            frame = encode_frame(request(id, method, params))
        except ValueError as e:
            raise EvmmError(f"{method}: {e}") from None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[id] = (method, fut)
        self._writer.write(frame)
        return fut

    async def call(self, method: str, params: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Send one request and return its result; raises ``ControlError`` for an error response."""
        return await self._send(method, {**(params or {}), **kwargs})

    def send_nowait(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a request without waiting for its answer (console keystrokes); a failure is dropped."""
        fut = self._send(method, params)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        fut.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning

    # ---- events -------------------------------------------------------------------------------------------

    async def subscribe(self) -> str:
        """Start receiving machine events; returns the VM's state at that moment."""
        answer = await self.call("subscribe")
        return str(answer.get("state"))

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None once the connection is closed (or ``timeout`` seconds passed)."""
        try:
            ev = await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None
        if ev is None:
            self._events.put_nowait(None)  # stays closed for every later reader
        return ev

    async def events(self) -> AsyncIterator[Event]:
        """Machine events (after ``subscribe``), until the connection closes."""
        while (ev := await self.next_event()) is not None:
            yield ev

    # ---- console ------------------------------------------------------------------------------------------

    async def console_attach(self, replay: bool = True) -> bytes:
        """Attach to the guest console; returns its recent output when ``replay``."""
        answer = await self.call("console-attach", replay=replay)
        data = answer.get("replay", b"")
        return data if isinstance(data, bytes) else b""

    async def console_detach(self) -> None:
        await self.call("console-detach")

    def console_input(self, data: bytes) -> None:
        """Type ``data`` into the guest console (in order with earlier input)."""
        if data:
            self.send_nowait("console-input", {"data": data})

    async def console_output(self) -> AsyncIterator[bytes]:
        """Console output (after ``console_attach``), until the connection closes."""
        while (data := await self._console.get()) is not None:
            yield data
        self._console.put_nowait(None)

    async def console_resize(self, rows: int, cols: int) -> None:
        await self.call("console-resize", rows=rows, cols=cols)
