"""``evmm.control.Client``: the asyncio client of the msgpack control socket.

    async with Client("/run/vm.sock") as c:
        await c.call("pause")
        await c.subscribe()
        async for ev in c.events():
            print(ev.event, ev.data)

Built on ``evmm.rpc.connection.Connection``: responses reach the calls waiting for them and events go to
queues here, so calls may overlap and events never block answers.  Every failure is one ``EvmmError`` line:
``ControlError`` (with the server's ``code``) for an error response, plain ``EvmmError`` for a socket that is
missing or closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from evmm.errors import EvmmError
from evmm.rpc.connection import Connection, RpcError
from evmm.rpc.protocol import Event

CONSOLE_OUTPUT = "console-output"


class ControlError(RpcError):
    """The VMM answered a request with an error."""


class Client:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: Connection | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._console: asyncio.Queue[bytes | None] = asyncio.Queue()

    # ---- connection ---------------------------------------------------------------------------------------

    async def connect(self) -> Client:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path))
        except FileNotFoundError:
            raise EvmmError(
                f"{self.path}: no control socket there (is the VM running with --api-sock?)"
            ) from None
        except ConnectionRefusedError:
            raise EvmmError(f"{self.path}: nothing is listening (the VM has exited)") from None
        except OSError as e:
            raise EvmmError(f"{self.path}: cannot connect: {e.strerror or e}") from None
        self._conn = Connection(
            reader,
            writer,
            peer="the VMM",
            name="control connection",
            on_event=self._on_event,
            on_close=self._on_close,
            error_type=ControlError,
        )
        return self

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.connected

    @property
    def closed_reason(self) -> str | None:
        return None if self._conn is None else self._conn.closed_reason

    def _on_event(self, message: Event) -> None:
        if message.event == CONSOLE_OUTPUT:
            data = message.data.get("data")
            if isinstance(data, bytes):
                self._console.put_nowait(data)
        else:
            self._events.put_nowait(message)

    def _on_close(self, reason: str) -> None:
        self._events.put_nowait(None)
        self._console.put_nowait(None)

    # ---- requests -----------------------------------------------------------------------------------------

    def _connection(self, method: str) -> Connection:
        if self._conn is None:
            raise EvmmError(f"{method}: not connected")
        return self._conn

    async def call(self, method: str, params: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Send one request and return its result; raises ``ControlError`` for an error response."""
        return await self._connection(method).call(method, {**(params or {}), **kwargs})

    def send_nowait(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a request without waiting for its answer (console keystrokes); a failure is dropped."""
        self._connection(method).send_nowait(method, params)

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
