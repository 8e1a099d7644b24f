"""The command core: every control method, once, for the msgpack server, QMP and the escape menu.

A method is a ``Command``: a name, a table of typed parameters and an async handler.  ``Commands.call``
validates the parameters, runs the handler on the reactor and turns every failure into a ``CommandError``
with an ``ErrorCode`` and a one-line message, so no request, however wrong, can take the VMM down.  Methods
to come (snapshot, balloon, metrics) are ``register``-ed the same way, from their own modules.

State changes a command causes reach subscribers as the machine's own events (``state-changed`` from
``Machine.pause``/``resume``/``run``/``stop``): the machine knows its state best, so it is the one place that
announces it, as StratoVirt's ``notify_lifecycle`` does.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.errors import EvmmError
from evmm.exitcodes import EXIT_GUEST_POWEROFF, EXIT_GUEST_RESET
from evmm.log import log
from evmm.record import record
from evmm.rpc.protocol import ErrorCode

PAUSE_TIMEOUT = 15.0  # seconds for every vCPU to leave KVM_RUN; far more than a kick takes, even nested
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")

Listener = Callable[[str, dict[str, Any]], None]


class ControlledMachine(Protocol):
    """What the control plane uses of ``evmm.machine.machine.Machine`` (a fake stands in for tests)."""

    @property
    def state(self) -> str: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    def stop(self, code: int, message: str) -> None: ...

    def power_button(self) -> None: ...

    def ctrl_alt_del(self) -> bool: ...

    def describe(self) -> dict[str, Any]: ...

    def device_list(self) -> list[dict[str, Any]]: ...

    def subscribe(self, listener: Listener) -> Callable[[], None]: ...


@runtime_checkable
class HotplugMachine(Protocol):
    """A machine with hot-replace slots (``evmm run --hotplug``); it announces each change (``device-changed``)."""

    def hotplug_slots(self) -> list[dict[str, Any]]: ...

    def replace_device(self, slot_id: str, spec: DriveSpec | NetSpec) -> object: ...

    def remove_device(self, slot_id: str) -> object: ...


class CommandError(Exception):
    """A request that failed: the code and one line for the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---- parameters -----------------------------------------------------------------------------------------

_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    bool: "boolean",
    bytes: "binary",
    float: "float",
    list: "array",
    dict: "map",
}


class Wording:
    """How parameter faults are put to a client: evmm's words here; QMP's subclass uses QEMU's."""

    type_names: ClassVar[Mapping[type, str]] = _TYPE_NAMES
    nil_is_absent = True  # msgpack nil means "not given"; JSON null in QMP is a value of the wrong type

    def unknown(self, method: str, key: str, known: Sequence[str]) -> str:
        return f"{method}: unknown parameter {key!r} (takes {', '.join(known) or 'no parameters'})"

    def missing(self, method: str, name: str) -> str:
        return f"{method}: parameter {name!r} is required"

    def wrong_type(self, method: str, name: str, value: object, expected: type) -> str:
        got = _TYPE_NAMES.get(type(value), type(value).__name__)
        return f"{method}: {name} is a {got}, not a {self.type_names[expected]}"


EVMM_WORDING = Wording()


@record(frozen=True)
class Param:
    """One parameter: its type, whether it is required, its default, for strings the allowed values, and for
    a map the parameters it holds (checked as the method's own are)."""

    type: type
    doc: str = ""
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    lo: int = 0
    hi: int = 1 << 31
    fields: Mapping[str, Param] | None = None

    def check(self, method: str, name: str, value: Any, wording: Wording = EVMM_WORDING) -> Any:
        if self.type is bytes and isinstance(value, str):
            value = value.encode()
        if (self.type is int and isinstance(value, bool)) or not isinstance(value, self.type):
            raise CommandError(ErrorCode.INVALID_PARAMS, wording.wrong_type(method, name, value, self.type))
        if isinstance(value, int) and not isinstance(value, bool) and not self.lo <= value <= self.hi:
            raise CommandError(
                ErrorCode.INVALID_PARAMS, f"{method}: {name}={value} is out of range ({self.lo} to {self.hi})"
            )
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                raise CommandError(
                    ErrorCode.INVALID_PARAMS,
                    f"{method}: {name}={value!r} is not one of {', '.join(self.choices)}",
                )
            if not value or len(value) > 4096 or "\0" in value:
                raise CommandError(ErrorCode.INVALID_PARAMS, f"{method}: {name} must be 1 to 4096 characters")
        if self.fields is not None and isinstance(value, dict):
            value = check_params(method, self.fields, value, wording)
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": _TYPE_NAMES[self.type], "required": self.required, "doc": self.doc}
        if self.default is not None:
            out["default"] = self.default
        if self.choices:
            out["choices"] = list(self.choices)
        return out


def check_params(
    method: str, spec: Mapping[str, Param], params: Mapping[str, Any], wording: Wording = EVMM_WORDING
) -> dict[str, Any]:
    """Validated parameters with defaults filled in, or ``CommandError(INVALID_PARAMS)`` naming the first fault.

    Every parameter of ``spec`` is in the result: an absent one as its default (None unless given).
    """
    for key in params:
        if key not in spec:
            raise CommandError(ErrorCode.INVALID_PARAMS, wording.unknown(method, key, list(spec)))
    out: dict[str, Any] = {}
    for name, p in spec.items():
        given = name in params and not (wording.nil_is_absent and params[name] is None)
        if not given:
            if p.required:
                raise CommandError(ErrorCode.INVALID_PARAMS, wording.missing(method, name))
            out[name] = p.default
        else:
            out[name] = p.check(method, name, params[name], wording)
    return out


# ---- the table ---------------------------------------------------------------------------------------------


@record(frozen=True)
class Call:
    method: str
    params: dict[str, Any]
    client: str  # who asked, for messages like "quit by control client 2 (pid 4242)"


Handler = Callable[[Call], Awaitable[Any]]


@record(frozen=True)
class Command:
    name: str
    handler: Handler
    doc: str
    params: Mapping[str, Param] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "doc": self.doc, "params": {k: p.schema() for k, p in self.params.items()}}


def device_spec(
    method: str, kind: str, what: str, p: Mapping[str, Any], noun: str = " slot"
) -> DriveSpec | NetSpec:
    """A disk (``path``, ``readonly``) or a NIC (``tap``, ``mac``) from a request's parameters; ``what`` and
    ``noun`` frame the target in messages ("hp-blk0 is a" disk " slot", "kind=blk is a" disk "")."""
    if kind == "blk":
        if p["path"] is None or p["tap"] is not None or p["mac"] is not None:
            raise CommandError(
                ErrorCode.INVALID_PARAMS, f"{method}: {what} disk{noun}: give path (and readonly)"
            )
        return DriveSpec(path=Path(p["path"]), readonly=p["readonly"])
    if kind == "net":
        if p["tap"] is None or p["path"] is not None or p["readonly"]:
            raise CommandError(
                ErrorCode.INVALID_PARAMS, f"{method}: {what} network{noun}: give tap (and mac)"
            )
        if not 0 < len(p["tap"]) < 16:
            raise CommandError(
                ErrorCode.INVALID_PARAMS, f"{method}: tap={p['tap']!r} is not 1 to 15 characters"
            )
        mac = p["mac"]
        if mac is not None and (not _MAC_RE.match(mac) or int(mac[:2], 16) & 1):
            raise CommandError(
                ErrorCode.INVALID_PARAMS, f"{method}: mac={mac!r} is not a unicast MAC like 52:54:00:12:34:56"
            )
        return NetSpec(tap=p["tap"], mac=mac)
    raise CommandError(ErrorCode.FAILED, f"{method}: {what}{noun} of kind {kind!r}, which evmm cannot fill")


def _slot_param(doc: str = "hot-replace slot id, e.g. hp-blk0 (query-hotplug lists them)") -> Param:
    return Param(str, doc, required=True)


class Commands:
    """The methods for one machine; ``call`` is the only way in."""

    def __init__(self, machine: ControlledMachine, *, pause_timeout: float = PAUSE_TIMEOUT) -> None:
        self.machine = machine
        self.pause_timeout = pause_timeout
        self.table: dict[str, Command] = {}
        self.stop_cause: tuple[str, str] | None = None  # (method, client) of a quit or reset, for QMP
        self.console_size: tuple[int, int] | None = None  # (rows, cols) of the last console-resize
        # Pause, resume, a snapshot and hot-replace, one at a time: a snapshot writes guest memory with the
        # reactor running, and must find the same devices, frozen, from its start to its end.
        self._lifecycle = asyncio.Lock()
        reg = self.register
        reg(Command("query-status", self._query_status, "the VM's state: created, running, paused, stopped"))
        reg(Command("query-vm", self._query_vm, "configuration and live state: vCPUs, memory, devices"))
        reg(Command("query-commands", self._query_commands, "every method with its parameters"))
        reg(Command("pause", self._pause, "stop every vCPU; answers once all are parked"))
        reg(Command("resume", self._resume, "restart the vCPUs of a paused VM"))
        how = Param(
            str,
            "acpi (power button) or ctrl-alt-del (i8042)",
            default="acpi",
            choices=("acpi", "ctrl-alt-del"),
        )
        reg(Command("shutdown", self._shutdown, "ask the guest to power off", {"method": how}))
        reg(Command("quit", self._quit, "end the VM now (exit 0), without asking the guest"))
        reg(Command("reset", self._reset, "end the VM as a guest reboot does (exit 3)"))
        reg(Command("query-hotplug", self._query_hotplug, "the hot-replace slots and their backends"))
        reg(
            Command(
                "device-replace",
                self._device_replace,
                "fill a hot-replace slot: a disk image (blk) or a tap (net)",
                {
                    "slot": _slot_param(),
                    "path": Param(str, "disk image, for a blk slot"),
                    "readonly": Param(bool, "read-only disk", default=False),
                    "tap": Param(str, "tap interface, for a net slot"),
                    "mac": Param(str, "MAC address for a net slot, e.g. 52:54:00:12:34:56"),
                },
            )
        )
        reg(
            Command("device-remove", self._device_remove, "empty a hot-replace slot", {"slot": _slot_param()})
        )
        size = {
            "rows": Param(int, "terminal rows", required=True, lo=1, hi=10000),
            "cols": Param(int, "terminal columns", required=True, lo=1, hi=10000),
        }
        reg(Command("console-resize", self._console_resize, "the attached terminal's size", size))

    def register(self, command: Command) -> None:
        if command.name in self.table:
            raise ValueError(f"method {command.name!r} is registered twice")
        self.table[command.name] = command

    def schema(self) -> list[dict[str, Any]]:
        return [c.schema() for c in self.table.values()]

    async def call(self, method: str, params: Mapping[str, Any] | None = None, *, client: str) -> Any:
        """Run one method; every failure is a ``CommandError``."""
        command = self.table.get(method)
        if command is None:
            raise CommandError(
                ErrorCode.METHOD_NOT_FOUND, f"unknown method {method!r} (query-commands lists them)"
            )
        checked = check_params(method, command.params, params or {})
        try:
            return await command.handler(Call(method, checked, client))
        except CommandError:
            raise
        except EvmmError as e:
            raise CommandError(ErrorCode.FAILED, f"{method}: {e}") from None
        except Exception as e:  # a bug must cost one request, not the VMM
            log.exception("control method %s failed", method)
            raise CommandError(
                ErrorCode.INTERNAL_ERROR, f"{method} failed inside evmm: {type(e).__name__}: {e}"
            ) from None

    # ---- queries ------------------------------------------------------------------------------------------

    async def _query_status(self, call: Call) -> dict[str, Any]:
        state = self.machine.state
        return {"state": state, "running": state == "running"}

    async def _query_vm(self, call: Call) -> dict[str, Any]:
        return self.machine.describe()

    async def _query_commands(self, call: Call) -> list[dict[str, Any]]:
        return self.schema()

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def _need(self, method: str, *states: str) -> None:
        state = self.machine.state
        if state not in states:
            raise CommandError(ErrorCode.VM_STATE, f"{method}: the VM is {state}")

    async def _pause(self, call: Call) -> dict[str, Any]:
        return await self._transition(call.method, "paused", self.machine.pause)

    async def _resume(self, call: Call) -> dict[str, Any]:
        return await self._transition(call.method, "running", self.machine.resume)

    async def _transition(
        self, method: str, state: str, change: Callable[[], Awaitable[None]]
    ) -> dict[str, Any]:
        """Pause or resume, one at a time; a VM already in ``state`` is left as it is.  The machine announces
        the change itself (``state-changed``)."""
        async with self._lifecycle:
            self._need(method, "running", "paused")
            if self.machine.state != state:
                try:
                    await asyncio.wait_for(change(), self.pause_timeout)
                except TimeoutError:
                    raise CommandError(
                        ErrorCode.FAILED, f"the vCPUs did not reach {state} within {self.pause_timeout:g} s"
                    ) from None
            return {"state": self.machine.state}

    async def _shutdown(self, call: Call) -> dict[str, Any]:
        self._need("shutdown", "running", "paused")
        if call.params["method"] == "acpi":
            try:
                self.machine.power_button()
                return {"method": "acpi"}
            except EvmmError:
                pass  # no ACPI power button on this board: Ctrl-Alt-Del, as Firecracker does
        if not self.machine.ctrl_alt_del():
            raise CommandError(ErrorCode.FAILED, "shutdown: this machine has no i8042 to send Ctrl-Alt-Del")
        return {"method": "ctrl-alt-del"}

    async def _quit(self, call: Call) -> dict[str, Any]:
        self.stop_cause = self.stop_cause or ("quit", call.client)
        self.machine.stop(EXIT_GUEST_POWEROFF, f"quit by {call.client}")
        return {}

    async def _reset(self, call: Call) -> dict[str, Any]:
        # evmm cannot restart a guest in place yet: a reset ends the VM exactly as a guest reboot does.
        self.stop_cause = self.stop_cause or ("reset", call.client)
        self.machine.stop(EXIT_GUEST_RESET, f"reset by {call.client}")
        return {}

    # ---- hot-replace ----------------------------------------------------------------------------------------

    def _hotplug(self, method: str) -> HotplugMachine:
        if not isinstance(self.machine, HotplugMachine):
            raise CommandError(ErrorCode.FAILED, f"{method}: this machine has no hot-replace slots")
        return self.machine

    def _slot(self, method: str, machine: HotplugMachine, slot_id: str) -> dict[str, Any]:
        slots = machine.hotplug_slots()
        for slot in slots:
            if slot.get("id") == slot_id:
                return slot
        names = ", ".join(str(s.get("id")) for s in slots) or "none; start evmm run with --hotplug"
        raise CommandError(
            ErrorCode.INVALID_PARAMS, f"{method}: no hot-replace slot {slot_id!r} (slots: {names})"
        )

    async def _query_hotplug(self, call: Call) -> dict[str, Any]:
        return {"slots": self._hotplug(call.method).hotplug_slots()}

    async def _device_replace(self, call: Call) -> dict[str, Any]:
        machine = self._hotplug(call.method)
        p = call.params
        async with self._lifecycle:
            slot = self._slot(call.method, machine, p["slot"])
            machine.replace_device(slot["id"], self._spec(slot, p))  # the machine announces device-changed
            return self._slot(call.method, machine, slot["id"])

    async def _device_remove(self, call: Call) -> dict[str, Any]:
        machine = self._hotplug(call.method)
        async with self._lifecycle:
            slot = self._slot(call.method, machine, call.params["slot"])
            machine.remove_device(slot["id"])
            return self._slot(call.method, machine, slot["id"])

    @staticmethod
    def _spec(slot: dict[str, Any], p: dict[str, Any]) -> DriveSpec | NetSpec:
        return device_spec("device-replace", str(slot.get("kind")), f"{slot.get('id')} is a", p)

    # ---- console --------------------------------------------------------------------------------------------

    async def _console_resize(self, call: Call) -> dict[str, Any]:
        # The serial console has no notion of a window size: it is recorded for query and for a virtio
        # console (VIRTIO_CONSOLE_F_SIZE, virtio 1.2 §5.3.6.1) once one can take it.
        self.console_size = (call.params["rows"], call.params["cols"])
        return {"rows": self.console_size[0], "cols": self.console_size[1], "applied": False}
