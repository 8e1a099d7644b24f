"""The standard board's PCI devices: virtio-pci functions in slots of bus 0, plugged at boot or while the
guest runs, and unplugged when the guest ejects them (ACPI hotplug, docs/standard-board.md).

Plugging a device is what firmware and the hotplug controller would do: give it a slot, an address for its
BAR in the board's windows, MSI-X vectors in KVM and an INTx line, then (hot-added) raise the GED's PCI
event so the guest's acpiphp scans the slot.  Removing one asks the guest (an Eject Request) and waits: the
device goes only when the guest's _EJ0 writes the EJECT register, after its driver let go, and a guest that
never does leaves it in place, with the request still standing.  Runs on the reactor.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.devices.irq import IrqLine
from evmm.devices.pci.bar import Bar, BarKind
from evmm.devices.pci.hotplug import PciHotplugRegisters
from evmm.devices.pci.intx import SharedLine, intx_gsi
from evmm.devices.pci.root import PciRoot
from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.pci import VirtioPci
from evmm.errors import ConfigError, EvmmError
from evmm.log import log
from evmm.machine.msi import GsiRouting, KvmMsiVectors, RoutingVm
from evmm.memory import GuestMemory
from evmm.record import record

Emit = Callable[[str, dict[str, Any]], None]


def make_device(spec: DriveSpec | NetSpec, index: int) -> VirtioDevice:
    """The virtio-blk or virtio-net device a hotplug request names (opened now: a bad path fails here)."""
    if isinstance(spec, DriveSpec):
        from evmm.devices.virtio.blk import make_blk

        return make_blk(spec)
    from evmm.devices.virtio.net import make_net

    # evmm's own data path: the seccomp filter, compiled at start, has no vhost ioctls for a NIC added later.
    return make_net(dataclasses.replace(spec, vhost=False), index)


class BarAllocator:
    """Addresses for BARs, as firmware assigns them before the OS runs: each window filled upwards, every BAR
    aligned to its size (PCI 3.0 §6.2.5.1); 64-bit BARs above 4 GiB."""

    def __init__(self, mem32: tuple[int, int], mem64: tuple[int, int]) -> None:
        self._windows = {BarKind.MEM32: mem32, BarKind.MEM64: mem64}
        self._next = {kind: base for kind, (base, _) in self._windows.items()}

    def allocate(self, bar: Bar) -> int:
        if bar.kind not in self._windows:
            raise ConfigError(f"BAR {bar.index}: the board assigns no {bar.kind.value} BARs")
        base, size = self._windows[bar.kind]
        address = -(-self._next[bar.kind] // bar.size) * bar.size
        if address + bar.size > base + size:
            raise ConfigError(
                f"the PCI {bar.kind.value} window is full: no room for a {bar.size:#x}-byte BAR"
            )
        self._next[bar.kind] = address + bar.size
        return address


@record
class _Plugged:
    name: str
    slot: int
    function: VirtioPci
    vectors: KvmMsiVectors
    removal: asyncio.Future[None] | None = None  # a removal the guest has been asked for


class PciDevices:
    def __init__(
        self,
        root: PciRoot,
        hotplug: PciHotplugRegisters,
        vm: RoutingVm,
        routing: GsiRouting,
        memory: GuestMemory,
        reactor: asyncio.AbstractEventLoop,
        bars: BarAllocator,
        intx: dict[int, SharedLine],
        intx_gsis: tuple[int, ...],
    ) -> None:
        self._root = root
        self._vm = vm
        self._routing = routing
        self._memory = memory
        self._reactor = reactor
        self._bars = bars
        self._intx = intx
        self._intx_gsis = intx_gsis
        self._plugged: dict[str, _Plugged] = {}
        self.hotplug = hotplug
        hotplug.on_eject = self.on_eject
        self._emit: Emit | None = None

    def attach(self, emit: Emit) -> None:
        """The machine's events (device-changed when the guest ejects a device)."""
        self._emit = emit

    def names(self) -> list[str]:
        return list(self._plugged)

    def add(self, name: str, device: VirtioDevice, *, hot: bool = False) -> int:
        """Plug ``device`` into the first free slot; ``hot``: tell the guest (a Device Check on its slot)."""
        if name in self._plugged:
            device.close()
            raise ConfigError(f"a PCI device named {name!r} exists already")
        slot = self._root.free_slot(1)
        if slot is None:
            device.close()
            raise ConfigError("every PCI slot of bus 0 is taken (31 devices)")
        vectors = KvmMsiVectors(self._vm, self._routing)
        function = VirtioPci(device, self._memory, self._reactor, vectors, on_error=log.warning)
        try:
            for index, bar in function.bars.items():
                function.program_bar(index, self._bars.allocate(bar))
            line: IrqLine = self._intx[intx_gsi(slot, 1, self._intx_gsis)].source()
            self._root.plug(slot, function, line)
        except BaseException:
            function.close()
            vectors.close()
            raise
        self._plugged[name] = _Plugged(name, slot, function, vectors)
        if hot:
            self.hotplug.announce_added(slot)
        return slot

    async def remove(self, name: str, timeout: float) -> None:
        """Ask the guest to eject ``name`` and wait until it has; ``asyncio.TimeoutError`` after ``timeout``
        seconds, the device still there and the request still standing (a later eject completes it)."""
        entry = self._plugged.get(name)
        if entry is None:
            known = ", ".join(self._plugged) or "none"
            raise ConfigError(f"no PCI device {name!r} (devices: {known})")
        if entry.removal is None:
            entry.removal = self._reactor.create_future()
            self.hotplug.request_removal(entry.slot)
        await asyncio.wait_for(asyncio.shield(entry.removal), timeout)

    def on_eject(self, slot: int) -> None:
        """The guest's _EJ0 for ``slot`` (whether we asked or it decided to): the device goes."""
        entry = next((p for p in self._plugged.values() if p.slot == slot), None)
        if entry is None:
            return  # an empty slot, or the host bridge: nothing to eject
        del self._plugged[entry.name]
        self._root.unplug(slot)
        self._release(entry)
        if entry.removal is not None and not entry.removal.done():
            entry.removal.set_result(None)
        if self._emit is not None:
            self._emit("device-changed", {"slot": entry.name, "action": "removed", "backend": None})

    def _release(self, entry: _Plugged) -> None:
        try:
            entry.function.close()
        except EvmmError as e:
            log.warning("%s: %s", entry.name, e)
        entry.vectors.close()

    def describe(self) -> list[dict[str, Any]]:
        """The bus as ``lspci`` would list it: slot, IDs, class, BARs, MSI-X, and evmm's name for the device."""
        out = []
        for slot, function in self._root.slots():
            entry = next((p for p in self._plugged.values() if p.slot == slot), None)
            out.append(
                {
                    "bdf": f"00:{slot:02x}.0",
                    "id": entry.name if entry is not None else None,
                    "removal_requested": entry is not None and entry.removal is not None,
                    **function.describe(),
                }
            )
        return out

    def close(self) -> None:
        for entry in list(self._plugged.values()):
            self._root.unplug(entry.slot)
            self._release(entry)
            if entry.removal is not None and not entry.removal.done():
                entry.removal.cancel()
        self._plugged.clear()
