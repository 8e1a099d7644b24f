"""The standard board's PCI device manager: firmware BAR assignment, plugging virtio devices into slots with
MSI-X and INTx, hot-adding (the GED told), removal that waits for the guest's eject and times out cleanly,
guest-initiated ejects, and the topology query-vm shows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from evmm.address_space import Container
from evmm.devices.pci.bar import Bar, BarKind
from evmm.devices.pci.host_bridge import HostBridge
from evmm.devices.pci.hotplug import REG_DOWN, REG_EJECT, REG_UP, PciHotplugRegisters
from evmm.devices.pci.intx import SharedLine
from evmm.devices.pci.root import PciRoot
from evmm.devices.virtio.pci import VirtioPci
from evmm.devices.virtio.rng import VirtioRng
from evmm.errors import ConfigError
from evmm.machine.msi import GsiRouting
from evmm.machine.pci_devices import BarAllocator, PciDevices
from tests.fakes.irq import RecordingIrqLine
from tests.fakes.pci import RoutingRecordingVm
from tests.fakes.virtio_driver import new_memory

GSIS = (16, 17, 18, 19, 20, 21, 22, 23)


class Board:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.root = PciRoot(Container("pci-mem", 1 << 64), Container("pci-io", 1 << 16))
        self.root.plug(0, HostBridge())
        self.ged = 0
        self.regs = PciHotplugRegisters(self.notify)
        self.vm = RoutingRecordingVm()
        self.lines = {gsi: RecordingIrqLine() for gsi in GSIS}
        self.pci = PciDevices(
            self.root,
            self.regs,
            self.vm,
            GsiRouting(self.vm, []),
            new_memory(),
            loop,
            BarAllocator((0xC000_0000, 0x2000_0000), (1 << 32, 1 << 35)),
            {gsi: SharedLine(line) for gsi, line in self.lines.items()},
            GSIS,
        )
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.pci.attach(lambda name, data: self.events.append((name, data)))

    def notify(self) -> None:
        self.ged += 1


def test_bars_are_aligned_to_their_size_and_a_full_window_is_one_line() -> None:
    bars = BarAllocator((0xC000_0000, 0x10000), (1 << 32, 0x20000))
    assert bars.allocate(Bar(0, 0x1000)) == 0xC000_0000
    assert bars.allocate(Bar(0, 0x8000)) == 0xC000_8000  # skips to its alignment
    assert bars.allocate(Bar(0, 0x8000, BarKind.MEM64)) == 1 << 32
    assert bars.allocate(Bar(0, 0x10000, BarKind.MEM64)) == (1 << 32) + 0x10000
    with pytest.raises(ConfigError, match="the PCI mem64 window is full"):
        bars.allocate(Bar(0, 0x8000, BarKind.MEM64))
    with pytest.raises(ConfigError, match="assigns no io BARs"):
        bars.allocate(Bar(0, 0x20, BarKind.IO))


def test_cold_plugged_devices_take_slots_bars_and_intx_lines(loop: asyncio.AbstractEventLoop) -> None:
    b = Board(loop)
    assert b.pci.add("rng0", VirtioRng()) == 1
    assert b.pci.add("rng1", VirtioRng()) == 2
    assert b.ged == 0  # cold: the guest enumerates them at boot
    topology = b.pci.describe()
    assert [(d["bdf"], d["id"], d["vendor"]) for d in topology] == [
        ("00:00.0", None, 0x1B36),
        ("00:01.0", "rng0", 0x1AF4),
        ("00:02.0", "rng1", 0x1AF4),
    ]
    function = b.root.device(2)
    assert function is not None
    assert function.bars[0].programmed(function.config) == (1 << 32) + 0x8000  # the next 32 KiB BAR
    function.set_intx(True)
    assert b.lines[18].level  # slot 2, INTA#: the swizzle's third input
    with pytest.raises(ConfigError, match="named 'rng0' exists already"):
        b.pci.add("rng0", VirtioRng())


def test_a_hot_added_device_is_announced_through_the_ged(loop: asyncio.AbstractEventLoop) -> None:
    b = Board(loop)
    slot = b.pci.add("rng0", VirtioRng(), hot=True)
    assert b.ged == 1 and b.regs.read(REG_UP, 4) == 1 << slot


def test_removal_waits_for_the_guests_eject(loop: asyncio.AbstractEventLoop) -> None:
    b = Board(loop)
    b.pci.add("rng0", VirtioRng())
    function = b.root.device(1)
    assert isinstance(function, VirtioPci) and function.bar_address(0) is None  # the guest has not enabled it
    # The driver's MSI-X setup: enabled, vector 0 programmed and unmasked, and one interrupt sent through it.
    cap = next(off for off, cap_id in function.config.capabilities() if cap_id == 0x11)
    function.config_write(cap + 2, 2, 0x8000)
    for offset, value in ((0x4000, 0xFEE0_0000), (0x4008, 0x41), (0x400C, 0)):
        function.region.device.write(offset, 4, value)
    function.msix.trigger(0)
    assert len(b.vm.irqfds) == 1

    async def scenario() -> None:
        removal = asyncio.ensure_future(b.pci.remove("rng0", timeout=5))
        await asyncio.sleep(0.01)
        assert not removal.done() and b.ged == 1 and b.regs.read(REG_DOWN, 4) == 1 << 1
        assert b.pci.describe()[1]["removal_requested"]
        b.regs.write(REG_EJECT, 4, 1 << 1)  # the guest's _EJ0
        await asyncio.wait_for(removal, 1)

    loop.run_until_complete(scenario())
    assert b.root.device(1) is None and b.pci.names() == []
    assert b.events == [("device-changed", {"slot": "rng0", "action": "removed", "backend": None})]
    assert b.vm.irqfds == {}  # the vectors went with it


def test_a_guest_that_never_ejects_times_out_and_a_late_eject_still_completes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    b = Board(loop)
    b.pci.add("rng0", VirtioRng())
    with pytest.raises(TimeoutError):
        loop.run_until_complete(b.pci.remove("rng0", timeout=0.05))
    assert b.pci.names() == ["rng0"] and b.root.device(1) is not None
    with pytest.raises(TimeoutError):
        loop.run_until_complete(b.pci.remove("rng0", timeout=0.05))
    assert b.regs.read(REG_DOWN, 4) == 1 << 1 and b.ged == 1  # asked once, not again
    b.regs.write(REG_EJECT, 4, 1 << 1)
    assert b.pci.names() == [] and [e[1]["action"] for e in b.events] == ["removed"]


def test_the_guest_may_eject_on_its_own_and_ejects_of_nothing_are_ignored(
    loop: asyncio.AbstractEventLoop,
) -> None:
    b = Board(loop)
    b.pci.add("rng0", VirtioRng())
    b.regs.write(REG_EJECT, 4, (1 << 0) | (1 << 5))  # the host bridge and an empty slot
    assert b.root.device(0) is not None and b.pci.names() == ["rng0"]
    b.regs.write(REG_EJECT, 4, 1 << 1)
    assert b.pci.names() == [] and b.events[0][1]["slot"] == "rng0"
    with pytest.raises(ConfigError, match="no PCI device 'rng0'"):
        loop.run_until_complete(b.pci.remove("rng0", timeout=1))


def test_a_full_bus_is_one_line_and_closes_the_device(loop: asyncio.AbstractEventLoop) -> None:
    b = Board(loop)
    for i in range(31):
        b.pci.add(f"rng{i}", VirtioRng())
    with pytest.raises(ConfigError, match="every PCI slot of bus 0 is taken"):
        b.pci.add("one-more", VirtioRng())
    b.pci.close()
    assert [slot for slot, _ in b.root.slots()] == [0] and b.vm.irqfds == {}
