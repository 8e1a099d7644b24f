"""QMP, the QEMU Machine Protocol (qemu docs/interop/qmp-spec.rst), over evmm's command core.

``--qmp unix:PATH,server,nowait`` (QEMU's and StratoVirt's syntax) listens on PATH.  A client gets the greeting,
must send ``qmp_capabilities``, and may then run the commands in ``QmpServer.table``; ``stop``/``cont``/
``system_powerdown``/``system_reset``/``quit`` are the core's ``pause``/``resume``/``shutdown``/``reset``/
``quit``, and ``blockdev-add`` + ``device_add`` / ``device_del`` fill and empty microvm hot-replace slots.
Machine events become ``STOP``, ``RESUME``, ``SHUTDOWN``, ``RESET`` and ``DEVICE_DELETED``.

The socket and the JSON stream are the RPC core's (evmm/rpc/server.py, evmm/rpc/qmp_wire.py); this module
is what the commands mean.  The option parsing and the event mapping are pure; ``QmpServer`` is the asyncio
side.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from evmm import exitcodes
from evmm.control.commands import CommandError, Commands, Param, Wording, check_params
from evmm.control.qmp_devices import ARGS, DeviceBook
from evmm.errors import ConfigError
from evmm.rpc.qmp_wire import QmpCodec, QmpError, event, greeting, parse_execute, qmp_error
from evmm.rpc.server import RpcServer, Session

# ---- the option --------------------------------------------------------------------------------------------


def parse_qmp_spec(text: str) -> Path:
    """``unix:PATH,server,nowait`` (or ``server=on,wait=off``) to PATH; anything else is a ``ConfigError``."""
    if not text.startswith("unix:"):
        raise ConfigError(f"--qmp {text!r}: only unix:PATH,server,nowait is supported")
    path, *opts = text[len("unix:") :].split(",")
    if not path:
        raise ConfigError(f"--qmp {text!r}: the socket path is empty")
    seen: dict[str, str] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "nowait" and not value:
            key, value = "wait", "off"
        if key not in ("server", "wait") or value not in ("", "on", "off"):
            raise ConfigError(f"--qmp {text!r}: unknown option {opt!r} (evmm takes server and nowait)")
        if key in seen:
            raise ConfigError(f"--qmp {text!r}: {key} given twice")
        seen[key] = value or "on"
    if seen.get("server") != "on":
        raise ConfigError(f"--qmp {text!r}: evmm only listens for QMP clients: add ,server")
    if seen.get("wait") != "off":
        raise ConfigError(f"--qmp {text!r}: evmm does not wait for a QMP client before booting: add ,nowait")
    return Path(path)


def _evmm_version() -> tuple[tuple[int, int, int], str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("evmm")
    except PackageNotFoundError:
        text = "0.0.0"
    nums = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]] + [0, 0, 0]
    return (nums[0], nums[1], nums[2]), f"evmm {text}"


# QEMU's ShutdownCause (qapi/run-state.json) for each way an evmm VM ends, and whether the guest asked.
_CAUSES = {
    exitcodes.EXIT_GUEST_POWEROFF: ("guest-shutdown", True),
    exitcodes.EXIT_GUEST_RESET: ("guest-reset", True),
    exitcodes.EXIT_TRIPLE_FAULT: ("guest-reset", True),
    exitcodes.EXIT_GUEST_PANIC: ("guest-panic", True),
    exitcodes.EXIT_SIGINT: ("host-signal", False),
    exitcodes.EXIT_SIGTERM: ("host-signal", False),
}


def shutdown_events(code: int, stop_cause: tuple[str, str] | None) -> list[tuple[str, dict[str, Any]]]:
    """The QMP events for a VM that ended with ``code``: SHUTDOWN, after RESET for a reset."""
    if stop_cause is not None and stop_cause[0] == "quit":
        reason, guest = "host-qmp-quit", False
    elif stop_cause is not None and stop_cause[0] == "reset":
        reason, guest = "host-qmp-system-reset", False
    else:
        reason, guest = _CAUSES.get(code, ("host-error", False))
    data = {"guest": guest, "reason": reason}
    if reason in ("guest-reset", "host-qmp-system-reset"):
        return [("RESET", data), ("SHUTDOWN", data)]
    return [("SHUTDOWN", data)]


QMP_STATUS = {"created": "prelaunch", "running": "running", "paused": "paused", "stopped": "shutdown"}


# ---- commands ----------------------------------------------------------------------------------------------


class QmpWording(Wording):
    """QEMU's words for argument faults (its QAPI input visitor's), which QMP tools match on."""

    type_names: ClassVar[Mapping[type, str]] = {
        str: "string",
        bool: "boolean",
        int: "int",
        dict: "object",
        list: "array",
    }
    nil_is_absent = False  # JSON null is a value, and not one any evmm QMP argument takes

    def unknown(self, method: str, key: str, known: Sequence[str]) -> str:
        return f"Parameter '{key}' is unexpected"

    def missing(self, method: str, name: str) -> str:
        return f"Parameter '{name}' is missing"

    def wrong_type(self, method: str, name: str, value: object, expected: type) -> str:
        return f"Invalid parameter type for '{name}', expected: {self.type_names[expected]}"


QMP_WORDING = QmpWording()


class QmpSession(Session):
    """A QMP client: commands other than qmp_capabilities, and events, wait for its negotiation."""

    negotiated = False


QmpHandler = Callable[[QmpSession, dict[str, Any]], Awaitable[Any]]


class QmpServer:
    """QMP on a Unix socket for one machine, through ``commands``."""

    def __init__(self, commands: Commands, path: Path) -> None:
        self.commands = commands
        self.rpc = RpcServer(
            path, "--qmp", QmpCodec(), QmpSession, self._handle, kind="QMP client", welcome=self._greet
        )
        self.book = DeviceBook()
        self._unsubscribe: Callable[[], None] | None = None
        self._last_state = commands.machine.state
        self.version, self.package = _evmm_version()
        self.table: dict[str, tuple[QmpHandler, Mapping[str, Param]]] = {}
        self._register("qmp_capabilities", self._capabilities, enable=Param(list))
        self._register("query-version", self._query_version)
        self._register("query-commands", self._query_commands)
        self._register("query-status", self._query_status)
        self._register("stop", self._core("pause"))
        self._register("cont", self._core("resume"))
        self._register("system_powerdown", self._core("shutdown", {"method": "acpi"}))
        self._register("system_reset", self._core("reset"))
        self._register("quit", self._core("quit"))
        self._register("query-block", self._query_block)
        self._register("blockdev-add", self._note(self.book.add_node), **ARGS["blockdev-add"])
        self._register("blockdev-del", self._note(self.book.del_node), **ARGS["blockdev-del"])
        self._register("netdev_add", self._note(self.book.add_netdev), **ARGS["netdev_add"])
        self._register("netdev_del", self._note(self.book.del_netdev), **ARGS["netdev_del"])
        self._register("device_add", self._device_add, **ARGS["device_add"])
        self._register("device_del", self._device_del, **ARGS["device_del"])

    def _register(self, name: str, handler: QmpHandler, **args: Param) -> None:
        self.table[name] = (handler, args)

    # ---- lifetime ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.rpc.start()
        self._unsubscribe = self.commands.machine.subscribe(self._on_event)

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.rpc.close()

    def _greet(self, session: QmpSession) -> None:
        session.send(greeting(self.version, self.package))

    async def _handle(self, session: QmpSession, message: dict[str, Any]) -> None:
        session.send(await self._dispatch(session, message))

    async def _dispatch(self, session: QmpSession, message: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any]
        try:
            name, args = parse_execute(message)
            # As QEMU: qmp_capabilities is the only command before negotiation, and is gone after it.
            if not session.negotiated and name != "qmp_capabilities":
                raise QmpError(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            if session.negotiated and name == "qmp_capabilities":
                raise QmpError(
                    "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
                )
            entry = self.table.get(name)
            if entry is None:
                raise QmpError("CommandNotFound", f"The command {name} has not been found")
            handler, spec = entry
            reply = {"return": await handler(session, check_params(name, spec, args, QMP_WORDING))}
        except QmpError as e:
            reply = qmp_error(e.cls, e.desc)
        except CommandError as e:
            reply = qmp_error("GenericError", e.message)
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    # ---- events ---------------------------------------------------------------------------------------------

    def _broadcast(self, name: str, data: dict[str, Any]) -> None:
        self.rpc.broadcast(
            event(name, data, time.time()), (s for s in self.rpc.sessions.values() if s.negotiated)
        )

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "state-changed":
            state = data.get("state")
            if state == "paused" and self._last_state != "paused":
                self._broadcast("STOP", {})
            elif state == "running" and self._last_state == "paused":
                self._broadcast("RESUME", {})
            self._last_state = str(state)
        elif kind == "shutdown":
            for name, payload in shutdown_events(int(data.get("code", 0)), self.commands.stop_cause):
                self._broadcast(name, payload)
        elif kind == "device-changed" and data.get("action") == "removed":
            slot = str(data.get("slot"))
            dev = self.book.device_in(slot) or slot
            self._broadcast("DEVICE_DELETED", {"device": dev, "path": f"/machine/peripheral/{dev}"})

    # ---- the commands ------------------------------------------------------------------------------------------

    def _core(self, method: str, params: dict[str, Any] | None = None) -> QmpHandler:
        async def run(session: QmpSession, args: dict[str, Any]) -> Any:
            await self.commands.call(method, params, client=session.name)
            return {}

        return run

    @staticmethod
    def _note(change: Callable[[dict[str, Any]], None]) -> QmpHandler:
        """A command that only changes the book: a named backend means nothing to the machine until device_add."""

        async def run(session: QmpSession, args: dict[str, Any]) -> Any:
            change(args)
            return {}

        return run

    async def _capabilities(self, session: QmpSession, args: dict[str, Any]) -> Any:
        for cap in args["enable"] or []:
            raise QmpError("GenericError", f"Capability '{cap}' not available")
        session.negotiated = True
        return {}

    async def _query_version(self, session: QmpSession, args: dict[str, Any]) -> Any:
        return greeting(self.version, self.package)["QMP"]["version"]

    async def _query_commands(self, session: QmpSession, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in self.table]

    async def _query_status(self, session: QmpSession, args: dict[str, Any]) -> Any:
        state = self.commands.machine.state
        return {"status": QMP_STATUS.get(state, state), "singlestep": False, "running": state == "running"}

    async def _slots(self, session: QmpSession) -> list[dict[str, Any]]:
        answer = await self.commands.call("query-hotplug", client=session.name)
        slots: list[dict[str, Any]] = answer["slots"]
        return slots

    async def _query_block(self, session: QmpSession, args: dict[str, Any]) -> Any:
        try:
            slots = await self._slots(session)
        except CommandError:
            slots = []  # a machine without hot-replace slots
        return self.book.query_block(self.commands.machine.device_list(), slots)

    async def _device_add(self, session: QmpSession, args: dict[str, Any]) -> Any:
        plan = self.book.plan(args)
        slot = self.book.free_slot(plan, await self._slots(session))
        await self.commands.call("device-replace", {"slot": slot, **plan.params}, client=session.name)
        self.book.attach(args["id"], slot, plan)
        return {}

    async def _device_del(self, session: QmpSession, args: dict[str, Any]) -> Any:
        slot = self.book.slot_of(args["id"])
        # DEVICE_DELETED goes out from the machine's device-changed, while the book still names the device.
        await self.commands.call("device-remove", {"slot": slot}, client=session.name)
        self.book.detach(args["id"])
        return {}
