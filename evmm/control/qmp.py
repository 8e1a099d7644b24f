"""QMP, the QEMU Machine Protocol (qemu docs/interop/qmp-spec.rst), over evmm's command core.

``--qmp unix:PATH,server,nowait`` (QEMU's and StratoVirt's syntax) listens on PATH.  A client gets the greeting,
must send ``qmp_capabilities``, and may then run the commands in ``QMP_COMMANDS``; ``stop``/``cont``/
``system_powerdown``/``system_reset``/``quit`` are the core's ``pause``/``resume``/``shutdown``/``reset``/
``quit``, and ``blockdev-add`` + ``device_add`` / ``device_del`` fill and empty microvm hot-replace slots.
Machine events become ``STOP``, ``RESUME``, ``SHUTDOWN``, ``RESET`` and ``DEVICE_DELETED``.

QMP is JSON objects back to back with no framing (QEMU parses a JSON stream; the ``qemu.qmp`` client sends no
newline), so ``JsonSplitter`` finds where each object ends by tracking brackets and strings.  That part and the
option parsing are pure; ``QmpServer`` is the asyncio side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from evmm import exitcodes
from evmm.control.commands import CommandError, Commands, Param, Wording, check_params
from evmm.control.server import CLOSE_FLUSH, MAX_CLIENTS, MAX_QUEUED, bind_unix, peer_name
from evmm.errors import ConfigError
from evmm.log import log
from evmm.record import record

MAX_MESSAGE = 1 << 20
_WS = b" \t\r\n"


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


# ---- the wire ------------------------------------------------------------------------------------------------


@record(frozen=True)
class JsonError:
    """Input that is not a JSON object; ``fatal`` when no boundary can be trusted any more."""

    message: str
    fatal: bool = False


class JsonSplitter:
    """A byte stream of back-to-back JSON values in, each complete top-level value's bytes out."""

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_size
        self._scan = 0  # bytes of _buf already scanned
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._junk = False  # inside a run of bytes that cannot start a value
        self.broken = False

    def feed(self, data: bytes) -> list[bytes | JsonError]:
        if self.broken:
            return []
        self._buf += data
        out: list[bytes | JsonError] = []
        i = self._scan
        buf = self._buf
        start = 0
        while i < len(buf):
            c = buf[i]
            if self._depth == 0:
                if c in (0x7B, 0x5B):  # { [
                    self._junk = False
                    start = i
                    self._depth = 1
                elif c in _WS:
                    self._junk = False
                    start = i + 1
                else:
                    if not self._junk:
                        out.append(
                            JsonError(f"JSON parse error: unexpected {chr(c)!r}; QMP input is JSON objects")
                        )
                    self._junk = True
                    start = i + 1
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
            elif c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):
                self._depth += 1
            elif c in (0x7D, 0x5D):
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[start : i + 1]))
                    start = i + 1
            i += 1
            if self._depth and i - start > self._max:
                self.broken = True
                self._buf.clear()
                out.append(
                    JsonError(f"QMP message over {self._max} bytes; closing the connection", fatal=True)
                )
                return out
        del self._buf[:start]
        self._scan = len(self._buf)
        return out


def decode_message(raw: bytes) -> dict[str, Any] | JsonError:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return JsonError(f"JSON parse error: {e}")
    if not isinstance(value, dict):
        return JsonError("QMP input must be a JSON object")
    return value


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


def timestamp(now: float) -> dict[str, int]:
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


def greeting(version: tuple[int, int, int], package: str) -> dict[str, Any]:
    major, minor, micro = version
    qemu = {"major": major, "minor": minor, "micro": micro}
    return {"QMP": {"version": {"qemu": qemu, "package": package}, "capabilities": []}}


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


class QmpError(Exception):
    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


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


class QmpSession:
    def __init__(self, name: str, writer: asyncio.StreamWriter) -> None:
        self.name = name
        self.writer = writer
        self.negotiated = False
        self.closed = False

    def send(self, message: Mapping[str, Any]) -> None:
        if self.closed or self.writer.is_closing():
            return
        data = encode(message)
        if self.writer.transport.get_write_buffer_size() + len(data) > MAX_QUEUED:
            log.warning("qmp: %s does not read its events; disconnecting it", self.name)
            self.closed = True
            self.writer.transport.abort()
            return
        self.writer.write(data)


QmpHandler = Callable[[QmpSession, dict[str, Any]], Awaitable[Any]]


class QmpServer:
    """QMP on a Unix socket for one machine, through ``commands``."""

    def __init__(self, commands: Commands, path: Path) -> None:
        self.commands = commands
        self.path = path
        self.sessions: dict[int, QmpSession] = {}
        self.nodes: dict[str, _Node] = {}  # blockdev-add node-name -> image
        self.netdevs: dict[str, tuple[str, str | None]] = {}  # netdev id -> (ifname, device id using it)
        self.devices: dict[str, tuple[str, str]] = {}  # device_add id -> (slot, node or netdev)
        self._numbers = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
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
        sock = bind_unix(self.path, "--qmp")
        try:
            self._server = await asyncio.start_unix_server(self._accept, sock=sock)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--qmp {self.path}: {e}") from None
        self._unsubscribe = self.commands.machine.subscribe(self._on_event)

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions.values()):
            if not s.writer.is_closing():
                with contextlib.suppress(OSError, ConnectionError, TimeoutError):
                    await asyncio.wait_for(s.writer.drain(), CLOSE_FLUSH)
            s.closed = True
            s.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        number = next(self._numbers)
        session = QmpSession(peer_name("QMP client", number, writer), writer)
        try:
            if len(self.sessions) >= MAX_CLIENTS:
                session.send({"error": {"class": "GenericError", "desc": f"over {MAX_CLIENTS} QMP clients"}})
                return
            self.sessions[number] = session
            session.send(greeting(self.version, self.package))
            await self._serve(session, reader)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # close() ends every session this way; see ``ControlServer._accept`` for why not re-raised
        finally:
            self.sessions.pop(number, None)
            self._tasks.discard(task)
            if not session.closed:
                session.closed = True
                with contextlib.suppress(OSError, ConnectionError, TimeoutError):
                    await asyncio.wait_for(writer.drain(), CLOSE_FLUSH)
                writer.close()

    async def _serve(self, session: QmpSession, reader: asyncio.StreamReader) -> None:
        splitter = JsonSplitter(MAX_MESSAGE)
        while not session.closed:
            data = await reader.read(1 << 16)
            if not data:
                return
            for raw in splitter.feed(data):
                message = decode_message(raw) if isinstance(raw, bytes) else raw
                if isinstance(message, JsonError):
                    session.send({"error": {"class": "GenericError", "desc": message.message}})
                    if message.fatal:
                        return
                    continue
                reply = await self._dispatch(session, message)
                session.send(reply)

    async def _dispatch(self, session: QmpSession, message: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any]
        try:
            name, args = self._parse(message)
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
            reply = {"error": {"class": e.cls, "desc": e.desc}}
        except CommandError as e:
            reply = {"error": {"class": "GenericError", "desc": e.message}}
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    @staticmethod
    def _parse(message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        for key in message:
            if key not in ("execute", "arguments", "id"):
                if key == "exec-oob":
                    raise QmpError(
                        "GenericError", "exec-oob needs the oob capability, which evmm does not offer"
                    )
                raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
        name = message.get("execute")
        if not isinstance(name, str):
            raise QmpError("GenericError", "QMP input member 'execute' must be a string")
        args = message.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
        return name, args

    # ---- events ---------------------------------------------------------------------------------------------

    def _broadcast(self, name: str, data: dict[str, Any]) -> None:
        message = {"event": name, "data": data, "timestamp": timestamp(time.time())}
        for s in list(self.sessions.values()):
            if s.negotiated:
                s.send(message)

    def _on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "state-changed":
            state = data.get("state")
            if state == "paused" and self._last_state != "paused":
                self._broadcast("STOP", {})
            elif state == "running" and self._last_state == "paused":
                self._broadcast("RESUME", {})
            self._last_state = str(state)
        elif event == "shutdown":
            for name, payload in shutdown_events(int(data.get("code", 0)), self.commands.stop_cause):
                self._broadcast(name, payload)
        elif event == "device-changed" and data.get("action") == "removed":
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
