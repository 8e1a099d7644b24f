"""evmm's control plane: the msgpack control socket, its client, QMP, and the interactive console's menu.

``evmm run`` calls ``start_control`` once the machine is built, and awaits the closer it returns after the
machine has stopped.  docs/control-protocol.md describes the wire format and every method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from evmm.lazy import lazy_names

if TYPE_CHECKING:
    from evmm.control.client import Client, ControlError
    from evmm.control.commands import Command, CommandError, Commands, ControlledMachine, Param
    from evmm.control.qmp import QmpServer, parse_qmp_spec
    from evmm.control.server import ConsoleLike, ControlServer
    from evmm.machine.machine import Machine
    from evmm.rpc.protocol import ErrorCode, Event

# Each name loads its module on first use (PEP 562): ``evmm run`` without --api-sock or --qmp needs the
# command core for its escape menu, not the servers, the client or QMP's JSON.
_LAZY = {
    "Client": "evmm.control.client",
    "ControlError": "evmm.control.client",
    "Command": "evmm.control.commands",
    "CommandError": "evmm.control.commands",
    "Commands": "evmm.control.commands",
    "ControlledMachine": "evmm.control.commands",
    "Param": "evmm.control.commands",
    "QmpServer": "evmm.control.qmp",
    "parse_qmp_spec": "evmm.control.qmp",
    "ControlServer": "evmm.control.server",
    "ErrorCode": "evmm.rpc.protocol",
    "Event": "evmm.rpc.protocol",
}


__getattr__ = lazy_names(__name__, _LAZY)

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
    if commands is None:
        from evmm.control.commands import Commands

        commands = Commands(machine)
    servers: list[ControlServer | QmpServer] = []
    if api_sock is not None:
        from evmm.control.server import ControlServer

        servers.append(ControlServer(commands, console, api_sock))
    if qmp is not None:
        from evmm.control.qmp import QmpServer, parse_qmp_spec

        servers.append(QmpServer(commands, parse_qmp_spec(qmp)))
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
