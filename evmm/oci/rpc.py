"""The container monitor's RPC socket (``ROOT/ID/monitor.sock``): evmm's frames (evmm.rpc.protocol), a
request handler per method, events back to the connection that asked for them.

evmm-oci's commands (start, kill, pause, exec, ...) are short-lived clients; an exec monitor holds its
connection for as long as its process runs and gets that process's output as events.  Requests on one
connection are answered in order; a handler's ``EvmmError`` is that request's error response, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from evmm.errors import EvmmError
from evmm.rpc.connection import Connection
from evmm.rpc.protocol import (
    Decoder,
    ErrorCode,
    Event,
    ProtocolError,
    encode_frame,
    error,
    event,
    parse_request,
    result,
)

READ_CHUNK = 1 << 16
SUN_PATH = 100  # bytes of a socket path we pass as is (sockaddr_un's sun_path holds 107 and a NUL)


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A name for the socket ``path`` short enough to bind or connect to.

    Engines' state directories are deep (docker: /run/docker/runtime-NAME/moby/<64 hex digits>/), past what
    sun_path holds; through an fd of its directory, /proc/self/fd/N/NAME reaches the same file.
    """
    if len(os.fsencode(path)) <= SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class Session:
    """One client connection: its writer, and cleanups to run when it goes (its exec'd processes...)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.on_close: list[Callable[[], None]] = []

    def emit(self, name: str, data: Mapping[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(event(name, data, 0.0)))

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()


Handler = Callable[[Session, dict[str, Any]], Awaitable[Any]]


class MonitorServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with reachable(self.path) as name:
            sock.bind(name)
        os.chmod(self.path, 0o600)
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = Session(writer)
        decoder = Decoder()
        try:
            while data := await reader.read(READ_CHUNK):
                for item in decoder.feed(data):
                    if isinstance(item, ProtocolError):
                        writer.write(encode_frame(error(None, item.code, item.message)))
                        return
                    await self._handle(session, item)
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            for cleanup in session.on_close:
                cleanup()
            writer.close()

    async def _handle(self, session: Session, message: dict[str, Any]) -> None:
        try:
            req = parse_request(message)
        except ProtocolError as e:
            session.writer.write(encode_frame(error(e.id, e.code, e.message)))
            return
        handler = self.handlers.get(req.method)
        if handler is None:
            reply = error(req.id, ErrorCode.METHOD_NOT_FOUND, f"no method {req.method!r}")
        else:
            try:
                reply = result(req.id, await handler(session, req.params))
            except EvmmError as e:
                reply = error(req.id, ErrorCode.FAILED, str(e))
        session.writer.write(encode_frame(reply))
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
