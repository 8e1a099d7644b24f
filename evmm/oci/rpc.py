"""The container monitor's RPC socket (``ROOT/ID/monitor.sock``): evmm's frames on evmm's one server core
(evmm/rpc/server.py), a request handler per method, events back to the connection that asked for them.

evmm-oci's commands (start, kill, pause, exec, ...) are short-lived clients; an exec monitor holds its
connection for as long as its process runs and gets that process's output as events.  Requests on one
connection are answered in order; a handler's ``EvmmError`` is that request's error response, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from evmm.errors import EvmmError
from evmm.rpc import server
from evmm.rpc.codec import Codec, MsgpackCodec
from evmm.rpc.connection import Connection
from evmm.rpc.protocol import ErrorCode, Event, ProtocolError, error, event, parse_request, result
from evmm.unixsock import reachable


class Session(server.Session):
    """One client connection, and cleanups to run when it goes (its exec'd processes...)."""

    def __init__(self, number: int, name: str, writer: asyncio.StreamWriter, codec: Codec) -> None:
        super().__init__(number, name, writer, codec)
        self.on_close: list[Callable[[], None]] = []

    def emit(self, name: str, data: Mapping[str, Any]) -> None:
        self.send(event(name, data, 0.0))

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close(self, flush: float = 0.0) -> None:
        cleanups, self.on_close = self.on_close, []
        for cleanup in cleanups:
            cleanup()
        await super().close(flush)


Handler = Callable[[Session, dict[str, Any]], Awaitable[Any]]


class MonitorServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.rpc = server.RpcServer(
            path,
            "the container monitor's socket",
            MsgpackCodec(),
            Session,
            self._handle,
            kind="evmm-oci client",
        )

    async def start(self) -> None:
        await self.rpc.start()

    async def close(self) -> None:
        await self.rpc.close()

    async def _handle(self, session: Session, message: dict[str, Any]) -> None:
        try:
            req = parse_request(message)
        except ProtocolError as e:
            session.send(error(e.id, e.code, e.message))
            return
        handler = self.handlers.get(req.method)
        if handler is None:
            reply = error(req.id, ErrorCode.METHOD_NOT_FOUND, f"no method {req.method!r}")
        else:
            try:
                reply = result(req.id, await handler(session, req.params))
            except EvmmError as e:
                reply = error(req.id, ErrorCode.FAILED, str(e))
        session.send(reply)
        await session.drain()


async def connect(
    path: Path,
    on_event: Callable[[Event], None] | None = None,
    on_close: Callable[[str], None] | None = None,
) -> Connection:
    """A connection to a container monitor; ``EvmmError`` when nobody listens (the container stopped)."""
    try:
        with reachable(path) as name:
            reader, writer = await asyncio.open_unix_connection(name)
    except OSError as e:
        raise EvmmError(f"cannot reach the container's monitor at {path}: {e.strerror or e}") from None
    return Connection(
        reader,
        writer,
        peer="the container monitor",
        on_event=on_event or (lambda _e: None),
        on_close=on_close,
    )


async def call(path: Path, method: str, params: Mapping[str, Any] | None = None) -> Any:
    """One request to a container monitor, on a connection of its own."""
    conn = await connect(path)
    try:
        return await conn.call(method, params)
    finally:
        await conn.close()
