"""evmm's control plane: the msgpack control socket, its client, QMP, and the interactive console's menu.

``evmm run`` calls ``start_control`` once the machine is built, and awaits the closer it returns after the
machine has stopped.  docs/control-protocol.md describes the wire format and every method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from evmm.control.client import Client, ControlError
from evmm.control.commands import Command, CommandError, Commands, ControlledMachine, Param
from evmm.control.qmp import QmpServer, parse_qmp_spec
from evmm.control.server import ConsoleLike, ControlServer
from evmm.rpc.protocol import ErrorCode, Event

if TYPE_CHECKING:
    from evmm.machine.machine import Machine

__all__ = [
    "Client",
    "Command",
    "CommandError",
    "Commands",
    "ControlError",
    "ControlServer",
    "ControlledMachine",
    "ErrorCode",
    "Event",
    "Param",
    "QmpServer",
    "parse_qmp_spec",
    "start_control",
]


async def start_control(
    machine: Machine | ControlledMachine,
    console: ConsoleLike | None,
    *,
    api_sock: Path | None,
    qmp: str | None,
    commands: Commands | None = None,
) -> Callable[[], Awaitable[None]]:
    """Listen on ``api_sock`` (msgpack) and the ``--qmp`` spec, as asked; returns an async closer.

    ``commands``: the command core to serve, when the caller also drives it (the escape menu of ``evmm run``,
    so that a quit from the menu and one from QMP are told apart); by default a new one for ``machine``.

    Raises ``EvmmError`` (one line) for a bad ``--qmp`` spec or a socket path in use; nothing is left
    listening then.  The closer lets final answers and the shutdown event reach clients (for up to a second),
    disconnects everyone and removes the socket files.
    """
    qmp_path = parse_qmp_spec(qmp) if qmp is not None else None
    commands = commands if commands is not None else Commands(machine)
    servers: list[ControlServer | QmpServer] = []
    if api_sock is not None:
        servers.append(ControlServer(commands, console, api_sock))
    if qmp_path is not None:
        servers.append(QmpServer(commands, qmp_path))
    started: list[ControlServer | QmpServer] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
    except BaseException:
        for server in started:
            with contextlib.suppress(Exception):
                await server.close()
        raise

    async def close() -> None:
        for server in started:
            await server.close()

    return close
