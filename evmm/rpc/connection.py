"""The client side of an RPC stream (``evmm.rpc.protocol`` frames), for any socket that speaks them.

``Connection`` owns one stream: a reader task routes each response to the call waiting for it (matched by
id) and each event to ``on_event``, so calls may overlap and events never hold answers back.  The control
channel's ``Client`` and the guest agent's client are both built on it.  Every failure is one ``EvmmError``
line: ``RpcError`` (carrying the peer's ``code``) for an error response, plain ``EvmmError`` for a stream
that is closed or broken; once the stream ends, every call still waiting fails with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Mapping
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

READ_CHUNK = 1 << 16


class RpcError(EvmmError):
    """The peer answered a request with an error: its ``code`` and one line."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(message)
        self.method = method
        self.code = code


class Connection:
    """Requests out, responses and events in, over an already-open stream.

    ``peer`` and ``name`` word the error lines ("the VMM closed the control connection"); ``on_event`` is called on
    the loop for every event, in arrival order; ``on_close(reason)`` once, when the stream ends.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        name: str = "connection",
        on_event: Callable[[Event], None],
        on_close: Callable[[str], None] | None = None,
        error_type: Callable[[str, int, str], EvmmError] = RpcError,
    ) -> None:
        self.peer = peer
        self.name = name
        self._writer = writer
        self._on_event = on_event
        self._on_close = on_close
        self._error_type = error_type
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self.closed_reason: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop(reader))

    @property
    def connected(self) -> bool:
        return not self._task.done()

    async def close(self, reason: str = "the client was closed") -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._fail_all(self.closed_reason or reason)

    async def wait_closed(self) -> str:
        """Wait until the stream ends; returns why."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)
        return self.closed_reason or "closed"

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = Decoder()
        reason = f"{self.peer} closed the {self.name}"
        try:
            while data := await reader.read(READ_CHUNK):
                for item in decoder.feed(data):
                    if isinstance(item, ProtocolError):
                        reason = f"{self.peer} sent a bad frame: {item.message}"
                        return
                    try:
                        self._dispatch(parse_server_message(item))
                    except ProtocolError as e:
                        reason = f"{self.peer} sent a bad message: {e.message}"
                        return
        except (OSError, ConnectionError) as e:
            reason = f"{self.name} lost: {e}"
        finally:
            self.closed_reason = self.closed_reason or reason
            self._fail_all(self.closed_reason)
            if self._on_close is not None:
                self._on_close(self.closed_reason)

    def _dispatch(self, message: Response | Event) -> None:
        if isinstance(message, Event):
            self._on_event(message)
            return
        if message.id is None and message.error is not None:
            # An error the peer could not tie to a request (a broken frame of ours, too many clients).
            self.closed_reason = message.error.message
            return
        waiting = self._pending.pop(message.id, None) if isinstance(message.id, int) else None
        if waiting is None:
            return
        method, fut = waiting
        if fut.done():
            return
        if message.error is not None:
            fut.set_exception(self._error_type(method, message.error.code, message.error.message))
        else:
            fut.set_result(message.result)

    def _fail_all(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for method, fut in pending.values():
            if not fut.done():
                fut.set_exception(EvmmError(f"{method}: {reason}"))

    # ---- requests -----------------------------------------------------------------------------------------

    def send(self, method: str, params: Mapping[str, Any] | None = None) -> asyncio.Future[Any]:
        """Send one request; the future gets its result, or the peer's error as ``error_type``."""
        if not self.connected:
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

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        return await self.send(method, params)

    def send_nowait(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a request without waiting for its answer; a failure is dropped."""
        fut = self.send(method, params)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        fut.add_done_callback(lambda f: f.exception())  # retrieved: no "never retrieved" warning

    async def drain(self) -> None:
        """Wait until the stream's write buffer is below its high-water mark (flow control for bulk data)."""
        await self._writer.drain()
