"""The one server core under every evmm socket: a Unix socket on the reactor, many clients, one codec.

``RpcServer`` does what does not depend on the protocol: it binds the socket file (mode 0600; a stale one is
replaced, a live one is not), accepts up to ``MAX_CLIENTS`` clients and names each by its pid, reads each
through its own codec reader, caps the bytes waiting to go to each (``MAX_QUEUED``), and closes: last answers
and events go out for up to ``CLOSE_FLUSH`` seconds, then every client is dropped and the socket file
removed.  What the messages mean is the protocol's handler: the msgpack control channel
(evmm/control/server.py) and QMP (evmm/control/qmp.py) are each a codec and a handler on this core, as
StratoVirt's machine_manager serves its protocols over one socket layer.  Another user of the same frames
(a proxy to the guest agent) is one more ``RpcServer(path, option, MsgpackCodec(), ...)``.

Whatever a client does costs at most its own connection: input that is not a message gets the codec's error
answer (and a hang-up when the stream cannot be trusted after it), a client that stops reading while answers
and events pile up past ``MAX_QUEUED`` bytes is dropped, and one that leaves mid-request just never gets its
answer.  A connection's messages are handled in order, one at a time (so console input keeps its order).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from evmm.errors import EvmmError
from evmm.log import log
from evmm.rpc.codec import Codec, Fault
from evmm.unixsock import listen_unix

MAX_CLIENTS = 64
MAX_QUEUED = 4 << 20  # bytes waiting to go to one client; past this it is too slow and is disconnected
READ_CHUNK = 1 << 16
CLOSE_FLUSH = 1.0  # seconds to let last answers and the shutdown event reach clients when the VM ends


def peer_name(kind: str, number: int, writer: asyncio.StreamWriter) -> str:
    """``control client 3 (pid 4242)``: who asked, for stop reasons and logs (SO_PEERCRED, unix(7))."""
    sock = writer.get_extra_info("socket")
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f"{kind} {number} (pid {pid})"
    except (OSError, AttributeError, struct.error):
        return f"{kind} {number}"


class Session:
    """One connected client: its name, and the sending side with its byte limit.

    A protocol keeps its per-client state (subscriptions, QMP negotiation) in a subclass.
    """

    def __init__(self, number: int, name: str, writer: asyncio.StreamWriter, codec: Codec) -> None:
        self.number = number
        self.name = name
        self.writer = writer
        self.codec = codec
        self.closed = False

    def send(self, message: Mapping[str, Any]) -> None:
        try:
            data = self.codec.encode(message)
        except ValueError as e:  # an answer that does not encode: its request is still answered
            log.warning("%s: %s", self.name, e)
            data = self.codec.encode(self.codec.unencodable(message, str(e)))
        self.send_bytes(data)

    def send_bytes(self, data: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() + len(data) > MAX_QUEUED:
            log.warning("%s does not read what it is sent; disconnecting it", self.name)
            self.abort()
            return
        self.writer.write(data)

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def close(self, flush: float = 0.0) -> None:
        """Close, first letting what is queued go out for up to ``flush`` seconds."""
        if self.closed:
            return
        self.closed = True
        if flush and not self.writer.is_closing():
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                await asyncio.wait_for(self.writer.drain(), flush)
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), flush or 0.1)


S = TypeVar("S", bound=Session)


class RpcServer(Generic[S]):
    """A Unix socket serving one protocol: ``codec`` for the bytes, ``handle`` for each message.

    ``session`` makes each client's ``Session`` (a subclass holding the protocol's per-client state);
    ``welcome`` is called once a client is admitted, before it is read (QMP's greeting); ``kind`` names
    clients ("control client"); ``option`` names the socket in errors ("--api-sock").  ``handle(session,
    message)`` answers through ``session.send``, and turns its own failures into error answers
    (``Commands.call`` does so for every machine method).
    """

    def __init__(
        self,
        path: Path,
        option: str,
        codec: Codec,
        session: Callable[[int, str, asyncio.StreamWriter, Codec], S],
        handle: Callable[[S, dict[str, Any]], Awaitable[None]],
        *,
        kind: str,
        welcome: Callable[[S], None] | None = None,
    ) -> None:
        self.path = path
        self.option = option
        self.codec = codec
        self.kind = kind
        self.sessions: dict[int, S] = {}
        self._session = session
        self._handle = handle
        self._welcome = welcome
        self._numbers = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen; ``EvmmError`` (one line naming ``option`` and the path) when it cannot."""
        sock = listen_unix(self.path, self.option, private=True, deep=True)
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except OSError as e:
            sock.close()
            raise EvmmError(f"{self.option} {self.path}: {e}") from None

    async def close(self) -> None:
        """Stop listening, let last answers and events go out (briefly), drop every client, remove the socket."""
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(s.close(CLOSE_FLUSH) for s in list(self.sessions.values())))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(OSError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_FLUSH)
            self._server = None
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()

    def broadcast(self, message: Mapping[str, Any], sessions: Iterable[S]) -> None:
        """Send one message (an event) to each of ``sessions``, encoded once."""
        targets = list(sessions)
        if not targets:
            return
        try:
            data = self.codec.encode(message)
        except ValueError as e:
            log.warning("%s: not sent to %ss: %s", self.option, self.kind, e)
            return
        for s in targets:
            s.send_bytes(data)

    # ---- connections -------------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = next(self._numbers)
        session = self._session(number, peer_name(self.kind, number, writer), writer, self.codec)
        try:
            if len(self.sessions) >= MAX_CLIENTS:
                session.send(self.codec.refusal(f"over {MAX_CLIENTS} {self.kind}s"))
                return
            self.sessions[number] = session
            if self._welcome is not None:
                self._welcome(session)
            await self._serve(session, reader)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing of the VM depends on it
        except asyncio.CancelledError:
            # close() cancels the sessions still open, and the task must still end normally: CPython 3.11's
            # asyncio.streams calls task.exception() on a connection handler's finished task, which raises
            # for a cancelled one, and the loop would report that with a traceback on evmm run's terminal,
            # which is the guest's console.
            pass
        finally:
            self.sessions.pop(number, None)
            self._tasks.discard(task)
            await session.close(CLOSE_FLUSH)

    async def _serve(self, session: S, reader: asyncio.StreamReader) -> None:
        messages = self.codec.reader()
        while not session.closed:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            for item in messages.feed(data):
                if isinstance(item, Fault):
                    session.send(item.reply)
                    if item.fatal:
                        return
                    continue
                await self._handle(session, item)
                if session.closed:
                    return
