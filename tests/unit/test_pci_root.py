"""Bus 0: ECAM decoding, configuration mechanism #1 at 0xCF8, empty slots, plugging, INTx sharing and the
ACPI hotplug registers."""

from __future__ import annotations

import pytest

from evmm.address_space import Container
from evmm.devices.pci.function import PciFunction, PciIds
from evmm.devices.pci.host_bridge import HostBridge
from evmm.devices.pci.hotplug import PciHotplugRegisters
from evmm.devices.pci.intx import SharedLine, intx_gsi
from evmm.devices.pci.root import ConfigIo, Ecam, PciRoot
from evmm.errors import ConfigError
from tests.fakes.irq import RecordingIrqLine

NIC = PciIds(vendor=0x1AF4, device=0x1041, class_code=0x020000)


def root() -> PciRoot:
    r = PciRoot(Container("pci-mem", 1 << 64), Container("pci-io", 0x10000))
    r.plug(0, HostBridge())
    r.plug(3, PciFunction("nic", NIC, intx_pin=1))
    return r


def ecam_offset(bus: int, device: int, function: int, reg: int) -> int:
    """Written from PCI Express Base Specification §7.2.2 (Table 7-1), not from the code under test."""
    return bus * (1 << 20) + device * (1 << 15) + function * (1 << 12) + reg


# --- ECAM ---


def test_ecam_reaches_each_function_register() -> None:
    ecam = Ecam(root())
    assert ecam.size == 256 << 20
    assert ecam.read(ecam_offset(0, 0, 0, 0), 4) == 0x0008_1B36  # the host bridge
    assert ecam.read(ecam_offset(0, 0, 0, 0x0A), 2) == 0x0600
    assert ecam.read(ecam_offset(0, 3, 0, 0), 2) == 0x1AF4
    assert ecam.read(ecam_offset(0, 3, 0, 0x0B), 1) == 0x02
    ecam.write(ecam_offset(0, 3, 0, 0x3C), 1, 11)
    assert ecam.read(ecam_offset(0, 3, 0, 0x3C), 2) == 0x010B  # line 11, pin INTA#


@pytest.mark.parametrize(
    ("bus", "device", "function"),
    [(0, 1, 0), (0, 31, 0), (1, 0, 0), (255, 3, 0), (0, 3, 1), (0, 0, 7)],
)
def test_ecam_reads_all_ones_where_no_function_answers(bus: int, device: int, function: int) -> None:
    ecam = Ecam(root())
    for size in (1, 2, 4, 8):
        assert ecam.read(ecam_offset(bus, device, function, 0), size) == (1 << (8 * size)) - 1
    ecam.write(ecam_offset(bus, device, function, 0x04), 2, 0xFFFF)  # goes nowhere, raises nothing


def test_ecam_extended_space_of_a_conventional_function_reads_zero_and_straddling_reads_ones() -> None:
    ecam = Ecam(root())
    assert ecam.read(ecam_offset(0, 3, 0, 0x100), 4) == 0
    assert ecam.read(ecam_offset(0, 3, 0, 0xFFE), 4) == 0xFFFF_FFFF  # half in the next function
    ecam.write(ecam_offset(0, 3, 0, 0xFFE), 4, 0)


# --- configuration mechanism #1 ---


def cf8(bus: int, device: int, function: int, reg: int, enable: bool = True) -> int:
    """CONFIG_ADDRESS as PCI 3.0 §3.2.2.3.2 lays it out."""
    return (int(enable) << 31) | (bus << 16) | (device << 11) | (function << 8) | reg


def test_config_address_then_data_reaches_a_register_and_each_data_byte_its_byte() -> None:
    io = ConfigIo(root())
    io.write(0, 4, cf8(0, 3, 0, 0x08))
    assert io.read(0, 4) == cf8(0, 3, 0, 0x08)  # Linux's pci_check_type1 reads the latch back
    assert io.read(4, 4) == 0x0200_0000  # class 02/00/00, revision 0
    assert io.read(7, 1) == 0x02  # 0xCFF: the register's fourth byte
    assert io.read(6, 2) == 0x0200
    io.write(0, 4, cf8(0, 3, 0, 0x3C))
    io.write(4, 1, 5)
    assert io.read(4, 2) == 0x0105


def test_config_address_ignores_reserved_bits_and_narrow_accesses() -> None:
    io = ConfigIo(root())
    io.write(0, 4, 0xFFFF_FFFF)
    assert io.read(0, 4) == 0x80FF_FFFC
    io.write(1, 1, 0x06)  # 0xCF9: not this board's; the latch keeps its value
    io.write(0, 2, 0)
    assert io.read(0, 4) == 0x80FF_FFFC
    assert io.read(1, 1) == 0xFF and io.read(0, 2) == 0xFFFF


def test_config_data_without_the_enable_bit_or_to_no_device_reads_all_ones() -> None:
    io = ConfigIo(root())
    io.write(0, 4, cf8(0, 0, 0, 0, enable=False))
    assert io.read(4, 4) == 0xFFFF_FFFF
    io.write(4, 4, 0)  # ignored
    io.write(0, 4, cf8(0, 9, 0, 0))
    assert io.read(4, 2) == 0xFFFF
    io.write(0, 4, cf8(0, 0, 0, 0))
    assert io.read(6, 4) == 0xFFFF_FFFF  # runs past 0xCFF


# --- plugging ---


def test_slots_plug_and_unplug_and_refuse_nonsense() -> None:
    r = root()
    assert [slot for slot, _ in r.slots()] == [0, 3]
    assert r.free_slot() == 1 and r.free_slot(first=3) == 4
    with pytest.raises(ConfigError, match="slot 3 already holds nic"):
        r.plug(3, PciFunction("other", NIC))
    with pytest.raises(ConfigError, match="out of range 0-31"):
        r.plug(32, PciFunction("other", NIC))
    nic = r.unplug(3)
    assert nic.name == "nic" and r.device(3) is None
    assert r.config_read(0, 3, 0, 0, 4) == 0xFFFF_FFFF
    with pytest.raises(ConfigError, match="slot 3 is empty"):
        r.unplug(3)


# --- INTx ---


def test_the_swizzle_spreads_slots_and_pins_over_the_inputs() -> None:
    gsis = (16, 17, 18, 19, 20, 21, 22, 23)
    assert [intx_gsi(slot, 1, gsis) for slot in range(10)] == [16, 17, 18, 19, 20, 21, 22, 23, 16, 17]
    assert [intx_gsi(3, pin, gsis) for pin in (1, 2, 3, 4)] == [19, 20, 21, 22]
    with pytest.raises(ValueError, match="pin 0"):
        intx_gsi(3, 0, gsis)


def test_a_shared_line_is_high_while_any_device_drives_it() -> None:
    line = RecordingIrqLine()
    shared = SharedLine(line)
    a, b = shared.source(), shared.source()
    a.set_level(True)
    b.set_level(True)
    a.set_level(False)
    assert line.level  # b still asserts
    a.set_level(False)
    b.set_level(False)
    assert line.changes == [True, False]


# --- ACPI hotplug registers ---


def test_hotplug_events_are_reported_once_and_ejects_reach_the_board() -> None:
    notified: list[str] = []
    ejected: list[int] = []
    regs = PciHotplugRegisters(lambda: notified.append("ged"), ejected.append)
    regs.announce_added(4)
    regs.announce_added(6)
    regs.request_removal(2)
    assert notified == ["ged"] * 3
    assert regs.read(0, 4) == (1 << 4) | (1 << 6)
    assert regs.read(0, 4) == 0  # read once
    assert regs.read(4, 4) == 1 << 2 and regs.read(4, 4) == 0
    regs.write(8, 4, (1 << 2) | (1 << 31))
    assert ejected == [2, 31]
    assert regs.read(8, 4) == 0


def test_hotplug_registers_ignore_accesses_that_are_not_dwords() -> None:
    ejected: list[int] = []
    regs = PciHotplugRegisters(lambda: None, ejected.append)
    regs.announce_added(1)
    assert regs.read(0, 1) == 0 and regs.read(0, 4) == 2  # the byte read did not clear it
    regs.write(8, 2, 0xFFFF)
    regs.write(0, 4, 0xFFFF_FFFF)
    assert ejected == []
