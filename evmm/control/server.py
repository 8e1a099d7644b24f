"""The msgpack control server: a Unix socket on the reactor, many clients, events, and the guest console.

Each connection reads frames through the pure ``Decoder`` and answers its requests in order (so console input
keeps its order).  Whatever a client does costs at most its own connection: a bad frame gets an error response,
a bad length prefix an error and a hang-up, a client that stops reading while events pile up past
``MAX_QUEUED`` bytes is dropped, and one that leaves mid-request just never gets its answer.

Methods that belong to a connection rather than to the machine are handled here: ``subscribe``,
``unsubscribe``, ``console-attach``, ``console-detach``, ``console-input``.  Everything else goes to the
shared ``Commands`` core.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from evmm.control.commands import Call, Command, CommandError, Commands, Param, check_params
from evmm.errors import EvmmError
from evmm.log import log
from evmm.rpc.protocol import (
    Decoder,
    ErrorCode,
    ProtocolError,
    Request,
    encode_frame,
    error,
    event,
    parse_request,
    result,
)

MAX_CLIENTS = 64
MAX_QUEUED = 4 << 20  # bytes waiting to go to one client; past this it is too slow and is disconnected
SCROLLBACK = 16 << 10  # console bytes replayed to a client that attaches, so it sees where the guest is
READ_CHUNK = 1 << 16
CLOSE_FLUSH = 1.0  # seconds to let last answers and the shutdown event reach clients when the VM ends


class ConsoleLike(Protocol):
    """What the server uses of ``evmm.loop.console.ConsoleIO``."""

    def add_output_listener(self, listener: Callable[[bytes], None]) -> Callable[[], None]: ...

    def inject(self, data: bytes) -> None: ...


def bind_unix(path: Path, option: str) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600); a stale socket file is replaced, a live one is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise EvmmError(f"{option} {path}: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise EvmmError(f"{option} {path}: exists and is not a socket; remove it or pick another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listens: left behind by a VMM that was killed
        else:
            raise EvmmError(f"{option} {path}: another process is listening there (a VMM still running?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # the socket can stop the VM: its owner only
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise EvmmError(f"{option} {path}: cannot listen: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def peer_name(kind: str, number: int, writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f"{kind} {number} (pid {pid})"
    except (OSError, AttributeError, struct.error):
        return f"{kind} {number}"


class Session:
    """One connected client."""

    def __init__(self, number: int, name: str, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.name = name
        self.writer = writer
        self.decoder = Decoder()
        self.subscribed = False
        self.console = False
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        try:
            frame = encode_frame(message)
        except ValueError as e:  # a result that does not pack: the client still gets its answer
            log.warning("control: %s: %s", self.name, e)
            frame = encode_frame(error(message.get("id"), ErrorCode.INTERNAL_ERROR, str(e)))
        self.send_frame(frame)

    def send_frame(self, frame: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() + len(frame) > MAX_QUEUED:
            log.warning("control: %s does not read its events; disconnecting it", self.name)
            self.abort()
            return
        self.writer.write(frame)

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def close(self, flush: float = 0.0) -> None:
        if self.closed:
            return
        self.closed = True
        if flush and not self.writer.is_closing():
            with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                await asyncio.wait_for(self.writer.drain(), flush)
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), flush or 0.1)


LocalHandler = Callable[[Session, Call], Awaitable[Any]]


class ControlServer:
    """The msgpack control socket for one machine."""

    def __init__(self, commands: Commands, console: ConsoleLike | None, path: Path) -> None:
        self.commands = commands
        self.console = console
        self.path = path
        self.sessions: dict[int, Session] = {}
        self._numbers = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._scrollback = bytearray()
        self._unsubscribe: list[Callable[[], None]] = []
        self.local: dict[str, tuple[Command, LocalHandler]] = {}
        self._local(
            "subscribe",
            self._subscribe,
            "receive every machine event (state-changed, shutdown, device-changed, ...)",
        )
        self._local("unsubscribe", self._unsubscribe_events, "stop receiving machine events")
        replay = Param(bool, "first send the console's recent output", default=True)
        self._local(
            "console-attach",
            self._console_attach,
            "receive console output as console-output events",
            {"replay": replay},
        )
        self._local("console-detach", self._console_detach, "stop receiving console output")
        data = Param(bytes, "bytes for the guest console", required=True)
        self._local("console-input", self._console_input, "type into the guest console", {"data": data})

    def _local(
        self, name: str, handler: LocalHandler, doc: str, params: dict[str, Param] | None = None
    ) -> None:
        async def unused(call: Call) -> Any:  # the schema's handler; sessions call ``handler`` instead
            raise CommandError(ErrorCode.INTERNAL_ERROR, f"{name} is a connection method")

        self.local[name] = (Command(name, unused, doc, params or {}), handler)

    async def start(self) -> None:
        sock = bind_unix(self.path, "--api-sock")
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except OSError as e:
            sock.close()
            raise EvmmError(f"--api-sock {self.path}: {e}") from None
        self._unsubscribe.append(self.commands.machine.subscribe(self._on_event))
        if self.console is not None:
            self._unsubscribe.append(self.console.add_output_listener(self._on_console))

    async def close(self) -> None:
        """Stop listening, let last answers and events go out (briefly), drop every client, remove the socket."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
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

    # ---- connections -------------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = next(self._numbers)
        session = Session(number, peer_name("control client", number, writer), writer)
        try:
            if len(self.sessions) >= MAX_CLIENTS:
                session.send(error(None, ErrorCode.TOO_MANY_CLIENTS, f"over {MAX_CLIENTS} control clients"))
                return
            self.sessions[number] = session
            await self._serve(session, reader)
        except (ConnectionError, OSError):
            pass  # the client went away; nothing of the VM depends on it
        except asyncio.CancelledError:
            # close() cancels the sessions still open.  The task ends here anyway, and must not end
            # cancelled: CPython 3.11's asyncio.streams calls task.exception() on a start_unix_server
            # handler's task when it is done, which raises for a cancelled one, and the loop then prints
            # "Exception in callback ..." and a traceback on the guest's console (seen at QMP quit).
            pass
        finally:
            self.sessions.pop(number, None)
            self._tasks.discard(task)
            await session.close(CLOSE_FLUSH if not session.closed else 0.0)

    async def _serve(self, session: Session, reader: asyncio.StreamReader) -> None:
        while not session.closed:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            for item in session.decoder.feed(data):
                if isinstance(item, ProtocolError):
                    session.send(error(item.id, item.code, item.message))
                    if item.fatal:
                        return
                    continue
                try:
                    request = parse_request(item)
                except ProtocolError as e:
                    session.send(error(e.id, e.code, e.message))
                    continue
                await self._handle(session, request)
                if session.closed:
                    return

    async def _handle(self, session: Session, request: Request) -> None:
        try:
            local = self.local.get(request.method)
            if request.method == "query-commands":
                value: Any = self.commands.schema() + [c.schema() for c, _ in self.local.values()]
            elif local is not None:
                command, handler = local
                params = check_params(request.method, command.params, request.params)
                value = await handler(session, Call(request.method, params, session.name))
            else:
                value = await self.commands.call(request.method, request.params, client=session.name)
        except CommandError as e:
            session.send(error(request.id, e.code, e.message))
        else:
            session.send(result(request.id, value))

    # ---- events --------------------------------------------------------------------------------------------

    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        targets = [s for s in self.sessions.values() if s.subscribed]
        if not targets:
            return
        try:
            frame = encode_frame(event(name, data, time.time()))
        except ValueError as e:
            log.warning("control: event %s not sent: %s", name, e)
            return
        for s in targets:
            s.send_frame(frame)

    async def _subscribe(self, session: Session, call: Call) -> dict[str, Any]:
        session.subscribed = True
        return {"state": self.commands.machine.state}

    async def _unsubscribe_events(self, session: Session, call: Call) -> dict[str, Any]:
        session.subscribed = False
        return {}

    # ---- console -------------------------------------------------------------------------------------------

    def _on_console(self, data: bytes) -> None:
        self._scrollback += data
        if len(self._scrollback) > SCROLLBACK:
            del self._scrollback[: len(self._scrollback) - SCROLLBACK]
        viewers = [s for s in self.sessions.values() if s.console]
        if not viewers:
            return
        # Chunks are what the reactor took in one wake-up, far below a frame; split anyway to be safe.
        for i in range(0, len(data), 1 << 16):
            frame = encode_frame(event("console-output", {"data": data[i : i + (1 << 16)]}, time.time()))
            for s in viewers:
                s.send_frame(frame)

    def _need_console(self, method: str) -> ConsoleLike:
        if self.console is None:
            raise CommandError(
                ErrorCode.FAILED,
                f"{method}: this VM's console is not on the control socket (--virtio-console stdio?)",
            )
        return self.console

    async def _console_attach(self, session: Session, call: Call) -> dict[str, Any]:
        self._need_console(call.method)
        session.console = True
        # No await between here and the answer: the replay reaches the client before any newer output.
        return {"replay": bytes(self._scrollback) if call.params["replay"] else b""}

    async def _console_detach(self, session: Session, call: Call) -> dict[str, Any]:
        session.console = False
        return {}

    async def _console_input(self, session: Session, call: Call) -> dict[str, Any]:
        data: bytes = call.params["data"]
        self._need_console(call.method).inject(data)
        return {"queued": len(data)}
