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
from evmm.errors import ConfigError
from evmm.record import record
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
_FILE_ARGS = {"driver": Param(str, required=True), "filename": Param(str, required=True), "aio": Param(str)}


@record
class _Node:
    path: str
    readonly: bool
    user: str | None = None  # the device id using it


BLK_DRIVERS = ("virtio-blk-device", "virtio-blk-mmio")
NET_DRIVERS = ("virtio-net-device", "virtio-net-mmio")


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
        self.nodes: dict[str, _Node] = {}  # blockdev-add node-name -> image
        self.netdevs: dict[str, tuple[str, str | None]] = {}  # netdev id -> (ifname, device id using it)
        self.devices: dict[str, tuple[str, str]] = {}  # device_add id -> (slot, node or netdev)
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
        # QEMU's form {"driver": "raw", "file": {"driver": "file", "filename": F}} and the flat
        # {"driver": "file", "filename": F}; StratoVirt's adds "cache", which a raw image file ignores here.
        self._register(
            "blockdev-add",
            self._blockdev_add,
            **{"node-name": Param(str, required=True), "read-only": Param(bool, default=False)},
            driver=Param(str),
            file=Param(dict),
            filename=Param(str),
            cache=Param(dict),
        )
        self._register("blockdev-del", self._blockdev_del, **{"node-name": Param(str, required=True)})
        self._register(
            "netdev_add",
            self._netdev_add,
            id=Param(str, required=True),
            type=Param(str, default="tap"),
            ifname=Param(str, required=True),
            script=Param(str, default="no"),
            downscript=Param(str, default="no"),
        )
        self._register("netdev_del", self._netdev_del, id=Param(str, required=True))
        self._register(
            "device_add",
            self._device_add,
            driver=Param(str, required=True),
            id=Param(str, required=True),
            drive=Param(str),
            netdev=Param(str),
            mac=Param(str),
        )
        self._register("device_del", self._device_del, id=Param(str, required=True))

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
            dev = next((d for d, (s, _) in self.devices.items() if s == slot), slot)
            self._broadcast("DEVICE_DELETED", {"device": dev, "path": f"/machine/peripheral/{dev}"})

    # ---- the commands ------------------------------------------------------------------------------------------

    def _core(self, method: str, params: dict[str, Any] | None = None) -> QmpHandler:
        async def run(session: QmpSession, args: dict[str, Any]) -> Any:
            await self.commands.call(method, params, client=session.name)
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
        out: list[dict[str, Any]] = []
        try:
            slots = await self._slots(session)
        except CommandError:
            slots = []  # a machine without hot-replace slots
        slot_ids = {s.get("id") for s in slots}
        for dev in self.commands.machine.device_list():
            # Cold-plugged disks, where the device describes itself with kind/path (see docs).
            if dev.get("kind") == "blk" and dev.get("path") and dev.get("id") not in slot_ids:
                out.append(
                    self._block(
                        str(dev.get("id") or dev["name"]), str(dev["path"]), bool(dev.get("readonly")), None
                    )
                )
        for slot in slots:
            if slot.get("kind") != "blk":
                continue
            qdev = next((d for d, (s, _) in self.devices.items() if s == slot["id"]), str(slot["id"]))
            node = self.devices.get(qdev, (None, None))[1]
            entry = self._block(
                qdev,
                slot.get("backend"),
                bool(self.nodes[node].readonly) if node in self.nodes else False,
                node,
            )
            out.append(entry)
        return out

    @staticmethod
    def _block(qdev: str, path: str | None, readonly: bool, node: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "device": "",
            "qdev": qdev,
            "locked": False,
            "removable": False,
            "type": "unknown",
        }
        if path:
            entry["inserted"] = {
                "file": path,
                "node-name": node or qdev,
                "ro": readonly,
                "drv": "raw",
                "encrypted": False,
                "backing_file_depth": 0,
                "detect_zeroes": "off",
            }
        return entry

    async def _blockdev_add(self, session: QmpSession, a: dict[str, Any]) -> Any:
        node = a["node-name"]
        if node in self.nodes:
            raise QmpError("GenericError", f"Duplicate nodes with node-name='{node}'")
        driver = a["driver"] or ("raw" if a["file"] is not None else "file")
        if driver not in ("raw", "file"):
            raise QmpError("GenericError", f"blockdev-add: driver '{driver}' is not supported (raw or file)")
        if a["file"] is not None:
            f = check_params("blockdev-add", _FILE_ARGS, a["file"], QMP_WORDING)
            if f["driver"] != "file" or a["filename"] is not None:
                raise QmpError("GenericError", "blockdev-add: give file: {driver: file, filename: PATH}")
            filename = f["filename"]
        elif a["filename"] is not None:
            filename = a["filename"]
        else:
            raise QmpError("GenericError", "Parameter 'filename' is missing")
        self.nodes[node] = _Node(filename, a["read-only"])
        return {}

    async def _blockdev_del(self, session: QmpSession, args: dict[str, Any]) -> Any:
        node = args["node-name"]
        entry = self.nodes.get(node)
        if entry is None:
            raise QmpError("GenericError", f"Failed to find node with node-name='{node}'")
        if entry.user is not None:
            raise QmpError("GenericError", f"Node '{node}' is busy: device {entry.user} uses it")
        del self.nodes[node]
        return {}

    async def _netdev_add(self, session: QmpSession, a: dict[str, Any]) -> Any:
        if a["type"] != "tap":
            raise QmpError("GenericError", f"netdev_add: type '{a['type']}' is not supported (tap)")
        if a["script"] != "no" or a["downscript"] != "no":
            raise QmpError("GenericError", "netdev_add: evmm runs no scripts: give script=no, downscript=no")
        if a["id"] in self.netdevs:
            raise QmpError("GenericError", f"Duplicate ID '{a['id']}' for netdev")
        self.netdevs[a["id"]] = (a["ifname"], None)
        return {}

    async def _netdev_del(self, session: QmpSession, args: dict[str, Any]) -> Any:
        nid = args["id"]
        entry = self.netdevs.get(nid)
        if entry is None:
            raise QmpError("GenericError", f"Device '{nid}' not found")
        if entry[1] is not None:
            raise QmpError("GenericError", f"netdev '{nid}' is used by device {entry[1]}")
        del self.netdevs[nid]
        return {}

    async def _device_add(self, session: QmpSession, a: dict[str, Any]) -> Any:
        driver, dev = a["driver"], a["id"]
        if dev in self.devices:
            raise QmpError("GenericError", f"Duplicate device ID '{dev}'")
        if driver in BLK_DRIVERS:
            kind, params, backend = "blk", self._drive_params(a), a["drive"]
        elif driver in NET_DRIVERS:
            kind, params, backend = "net", self._net_params(a), a["netdev"]
        else:
            choices = ", ".join(BLK_DRIVERS + NET_DRIVERS)
            raise QmpError("GenericError", f"device_add: driver '{driver}' is not supported ({choices})")
        free = [s for s in await self._slots(session) if s.get("kind") == kind and not s.get("occupied")]
        if not free:
            raise QmpError(
                "GenericError", f"device_add: no free {kind} hot-replace slot (evmm run --hotplug {kind}=N)"
            )
        slot = str(free[0]["id"])
        await self.commands.call("device-replace", {"slot": slot, **params}, client=session.name)
        self.devices[dev] = (slot, backend)
        if kind == "blk":
            self.nodes[backend].user = dev
        else:
            self.netdevs[backend] = (self.netdevs[backend][0], dev)
        return {}

    def _drive_params(self, a: dict[str, Any]) -> dict[str, Any]:
        if a["drive"] is None or a["netdev"] is not None or a["mac"] is not None:
            raise QmpError(
                "GenericError", "device_add: a virtio-blk device takes drive=NODE (from blockdev-add)"
            )
        node = self.nodes.get(a["drive"])
        if node is None:
            raise QmpError("GenericError", f"Drive '{a['drive']}' not found (blockdev-add it first)")
        if node.user is not None:
            raise QmpError("GenericError", f"Drive '{a['drive']}' is already in use by {node.user}")
        return {"path": node.path, "readonly": node.readonly}

    def _net_params(self, a: dict[str, Any]) -> dict[str, Any]:
        if a["netdev"] is None or a["drive"] is not None:
            raise QmpError(
                "GenericError", "device_add: a virtio-net device takes netdev=ID (from netdev_add)"
            )
        entry = self.netdevs.get(a["netdev"])
        if entry is None:
            raise QmpError("GenericError", f"Netdev '{a['netdev']}' not found (netdev_add it first)")
        if entry[1] is not None:
            raise QmpError("GenericError", f"Netdev '{a['netdev']}' is already in use by {entry[1]}")
        params: dict[str, Any] = {"tap": entry[0]}
        if a["mac"] is not None:
            params["mac"] = a["mac"]
        return params

    async def _device_del(self, session: QmpSession, args: dict[str, Any]) -> Any:
        dev = args["id"]
        entry = self.devices.get(dev)
        if entry is None:
            raise QmpError("DeviceNotFound", f"Device '{dev}' not found")
        slot, backend = entry
        await self.commands.call(
            "device-remove", {"slot": slot}, client=session.name
        )  # DEVICE_DELETED goes out
        del self.devices[dev]
        if backend in self.nodes:
            self.nodes[backend].user = None
        if backend in self.netdevs:
            self.netdevs[backend] = (self.netdevs[backend][0], None)
        return {}
