"""The msgpack control server: the control channel's methods, events and the guest console on an ``RpcServer``.

The socket, its clients and what a hostile client can cost are the core's (evmm/rpc/server.py); this module
adds what the control channel means.  Methods that belong to a connection rather than to the machine are
handled here: ``subscribe``, ``unsubscribe``, ``console-attach``, ``console-detach``, ``console-input``.
Everything else goes to the shared ``Commands`` core.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from evmm.control.commands import Call, Command, CommandError, Commands, Param, check_params
from evmm.rpc.codec import MsgpackCodec
from evmm.rpc.protocol import ErrorCode, ProtocolError, error, event, parse_request, result
from evmm.rpc.server import RpcServer, Session

SCROLLBACK = 16 << 10  # console bytes replayed to a client that attaches, so it sees where the guest is
CONSOLE_CHUNK = 1 << 16  # console bytes per event, far below a frame's limit


class ConsoleLike(Protocol):
    """What the server uses of ``evmm.loop.console.ConsoleIO``."""

    def add_output_listener(self, listener: Callable[[bytes], None]) -> Callable[[], None]: ...

    def inject(self, data: bytes) -> None: ...


class ControlSession(Session):
    """A control client: whether it takes machine events and console output."""

    subscribed = False
    console = False


LocalHandler = Callable[[ControlSession, Call], Awaitable[Any]]


class ControlServer:
    """The msgpack control socket for one machine."""

    def __init__(self, commands: Commands, console: ConsoleLike | None, path: Path) -> None:
        self.commands = commands
        self.console = console
        self.rpc = RpcServer(
            path, "--api-sock", MsgpackCodec(), ControlSession, self._handle, kind="control client"
        )
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
        await self.rpc.start()
        self._unsubscribe.append(self.commands.machine.subscribe(self._on_event))
        if self.console is not None:
            self._unsubscribe.append(self.console.add_output_listener(self._on_console))

    async def close(self) -> None:
        """Stop listening, let last answers and events go out (briefly), drop every client, remove the socket."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        await self.rpc.close()

    # ---- requests ------------------------------------------------------------------------------------------

    async def _handle(self, session: ControlSession, message: dict[str, Any]) -> None:
        try:
            request = parse_request(message)
        except ProtocolError as e:
            session.send(error(e.id, e.code, e.message))
            return
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
        self.rpc.broadcast(
            event(name, data, time.time()), (s for s in self.rpc.sessions.values() if s.subscribed)
        )

    async def _subscribe(self, session: ControlSession, call: Call) -> dict[str, Any]:
        session.subscribed = True
        return {"state": self.commands.machine.state}

    async def _unsubscribe_events(self, session: ControlSession, call: Call) -> dict[str, Any]:
        session.subscribed = False
        return {}

    # ---- console -------------------------------------------------------------------------------------------

    def _on_console(self, data: bytes) -> None:
        self._scrollback += data
        if len(self._scrollback) > SCROLLBACK:
            del self._scrollback[: len(self._scrollback) - SCROLLBACK]
        viewers = [s for s in self.rpc.sessions.values() if s.console]
        if not viewers:
            return
        # Chunks are what the reactor took in one wake-up, far below a frame; split anyway to be safe.
        for i in range(0, len(data), CONSOLE_CHUNK):
            self.rpc.broadcast(
                event("console-output", {"data": data[i : i + CONSOLE_CHUNK]}, time.time()), viewers
            )

    def _need_console(self, method: str) -> ConsoleLike:
        if self.console is None:
            raise CommandError(
                ErrorCode.FAILED,
                f"{method}: this VM's console is not on the control socket (--virtio-console stdio?)",
            )
        return self.console

    async def _console_attach(self, session: ControlSession, call: Call) -> dict[str, Any]:
        self._need_console(call.method)
        session.console = True
        # No await between here and the answer: the replay reaches the client before any newer output.
        return {"replay": bytes(self._scrollback) if call.params["replay"] else b""}

    async def _console_detach(self, session: ControlSession, call: Call) -> dict[str, Any]:
        session.console = False
        return {}

    async def _console_input(self, session: ControlSession, call: Call) -> dict[str, Any]:
        data: bytes = call.params["data"]
        self._need_console(call.method).inject(data)
        return {"queued": len(data)}
