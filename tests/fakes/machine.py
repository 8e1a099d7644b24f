"""A fake running machine and console for control-plane tests: the ``Machine`` API the control plane uses,
with vCPUs that take a while to park, hot-replace slots, and a record of every guest-visible request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.errors import EvmmError

Listener = Callable[[str, dict[str, Any]], None]


class FakeMachine:
    def __init__(
        self,
        *,
        park_delay: float = 0.0,
        acpi: bool = True,
        i8042: bool = True,
        slots: tuple[str, ...] = ("hp-blk0", "hp-blk1", "hp-net0"),
    ) -> None:
        self.park_delay = park_delay
        self.acpi = acpi
        self.i8042 = i8042
        self.paused = False
        self.started = True
        self.stop_request: tuple[int, str] | None = None
        self.power_presses = 0
        self.ctrl_alt_dels = 0
        self.pause_calls = 0
        self.listeners: list[Listener] = []
        self.emitted: list[tuple[str, dict[str, Any]]] = []
        self.slots: dict[str, dict[str, Any]] = {
            s: {"id": s, "kind": "net" if "net" in s else "blk", "occupied": False, "backend": None}
            for s in slots
        }
        self.specs: dict[str, DriveSpec | NetSpec] = {}
        self.fail_describe = False

    @property
    def state(self) -> str:
        if self.stop_request is not None:
            return "stopped"
        if self.paused:
            return "paused"
        return "running" if self.started else "created"

    async def pause(self) -> None:
        self.pause_calls += 1
        self.paused = True
        await asyncio.sleep(self.park_delay)  # vCPUs leaving KVM_RUN
        if self.state == "paused":  # as Machine.pause: the machine announces its own state
            self.emit("state-changed", {"state": "paused"})

    async def resume(self) -> None:
        self.paused = False
        await asyncio.sleep(self.park_delay)
        if self.state == "running":
            self.emit("state-changed", {"state": "running"})

    def stop(self, code: int, message: str) -> None:
        if self.stop_request is not None:
            return
        self.stop_request = (code, message)

        def stopped() -> None:
            self.emit("state-changed", {"state": "stopped"})
            self.emit("shutdown", {"code": code, "reason": message})

        asyncio.get_running_loop().call_soon(stopped)  # as Machine does, through call_soon_threadsafe

    def power_button(self) -> None:
        if not self.acpi:
            raise EvmmError("this machine has no ACPI power button")
        self.power_presses += 1

    def ctrl_alt_del(self) -> bool:
        if self.i8042:
            self.ctrl_alt_dels += 1
        return self.i8042

    def describe(self) -> dict[str, Any]:
        if self.fail_describe:
            raise RuntimeError("describe broke")
        return {
            "state": self.state,
            "memory": 256 << 20,
            "uptime": 1.5,
            "vcpus": [
                {"index": 0, "state": "running", "exits": 10},
                {"index": 1, "state": "running", "exits": 3},
            ],
            "devices": self.device_list(),
        }

    def device_list(self) -> list[dict[str, Any]]:
        return [{"name": "com1", "base": 0x3F8, "length": 8}]

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self.emitted.append((event, data))
        for listener in list(self.listeners):
            listener(event, data)

    # ---- hot-replace, as Machine has it -------------------------------------------------------------------

    def hotplug_slots(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.slots.values()]

    def replace_device(self, slot_id: str, spec: DriveSpec | NetSpec) -> None:
        slot = self.slots.get(slot_id)
        if slot is None:
            raise EvmmError(f"no hot-replace slot {slot_id}")
        if isinstance(spec, DriveSpec):
            if slot["kind"] != "blk":
                raise EvmmError(f"{slot_id} is not a disk slot")
            if not Path(spec.path).exists():
                raise EvmmError(f"{spec.path}: no such file")
            slot["backend"] = str(spec.path)
        else:
            if slot["kind"] != "net":
                raise EvmmError(f"{slot_id} is not a network slot")
            slot["backend"] = f"tap {spec.tap}"
        slot["occupied"] = True
        self.specs[slot_id] = spec
        self._device_changed(slot, "replaced")

    def remove_device(self, slot_id: str) -> None:
        slot = self.slots[slot_id]
        if not slot["occupied"]:
            raise EvmmError(f"{slot_id} is already empty")
        slot.update(occupied=False, backend=None)
        self.specs.pop(slot_id, None)
        self._device_changed(slot, "removed")

    def _device_changed(self, slot: dict[str, Any], action: str) -> None:
        data = {"slot": slot["id"], "kind": slot["kind"], "action": action, "backend": slot["backend"]}
        self.emit("device-changed", data)  # as Machine does


class FakeMachineWithoutHotplug:
    """Only the base API: no hot-replace slots."""

    def __init__(self) -> None:
        self._inner = FakeMachine()
        self.state = "running"

    async def pause(self) -> None:
        await self._inner.pause()

    async def resume(self) -> None:
        await self._inner.resume()

    def stop(self, code: int, message: str) -> None:
        self._inner.stop(code, message)

    def power_button(self) -> None:
        self._inner.power_button()

    def ctrl_alt_del(self) -> bool:
        return self._inner.ctrl_alt_del()

    def describe(self) -> dict[str, Any]:
        return self._inner.describe()

    def device_list(self) -> list[dict[str, Any]]:
        return self._inner.device_list()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._inner.subscribe(listener)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self._inner.emit(event, data)


class FakeConsole:
    """The ``ConsoleIO`` side the control server uses: output listeners and injected input."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[bytes], None]] = []
        self.injected = bytearray()

    def add_output_listener(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def inject(self, data: bytes) -> None:
        self.injected += data

    def output(self, data: bytes) -> None:
        """The guest printed ``data``."""
        for listener in list(self.listeners):
            listener(data)
