"""Type-0 config space: the header's read-only and writable bits, BAR sizing and decoding, BARs moved through
the region tree by command and BAR writes, capability lists, INTx, and hostile writes."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.address_space import AddressSpace, Alias, Container, Io, Region
from evmm.devices.pci.bar import Bar, BarKind
from evmm.devices.pci.config import (
    COMMAND_INTX_DISABLE,
    COMMAND_IO,
    COMMAND_MEMORY,
    COMMAND_WRITABLE,
    ConfigSpace,
)
from evmm.devices.pci.function import PciFunction, PciIds
from evmm.errors import ConfigError
from tests.fakes.address_space import FailingListener, RecordingListener
from tests.fakes.irq import RecordingIrqLine

IDS = PciIds(
    vendor=0x1AF4, device=0x1042, class_code=0x010000, revision=1, subsystem_vendor=0x1AF4, subsystem=0x40
)


class Regs:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class Dev(PciFunction):
    def __init__(self, name: str = "dev", bars: tuple[Bar, ...] = (), intx_pin: int = 0) -> None:
        super().__init__(name, IDS, bars, intx_pin=intx_pin)

    def bar_region(self, index: int) -> Region:
        return Io(f"{self.name}-bar{index}", self.bars[index].size, Regs())


MEM32 = Bar(0, 0x1000)
MEM64 = Bar(2, 0x4000, BarKind.MEM64, prefetchable=True)
IO = Bar(4, 0x20, BarKind.IO)


def board() -> tuple[AddressSpace, AddressSpace, Container, Container, RecordingListener, RecordingListener]:
    """A system space that shows the PCI memory space through a 32-bit and a 64-bit hole, and a port space."""
    pci_mem, pci_io = Container("pci-mem", 1 << 64), Container("pci-io", 0x10000)
    system = AddressSpace("memory", Container("system", 1 << 64))
    system.root.add(Alias("hole32", pci_mem, 0xC000_0000, 0x2000_0000), 0xC000_0000)
    system.root.add(Alias("hole64", pci_mem, 1 << 36, 1 << 35), 1 << 36)
    ports = AddressSpace("io", Container("ports", 0x10000))
    ports.root.add(Alias("pci-ports", pci_io, 0x1000, 0xF000), 0x1000)
    mem_rec, io_rec = RecordingListener(), RecordingListener()
    system.add_listener(mem_rec)
    ports.add_listener(io_rec)
    return system, ports, pci_mem, pci_io, mem_rec, io_rec


def attached(*bars: Bar) -> tuple[Dev, RecordingListener, RecordingListener]:
    _, _, mem, io, mem_rec, io_rec = board()
    dev = Dev(bars=bars)
    dev.attach(mem, io)
    return dev, mem_rec, io_rec


# --- the header ---


def test_the_header_says_who_the_function_is() -> None:
    dev = Dev(intx_pin=1)
    assert dev.config_read(0x00, 4) == 0x1042_1AF4
    assert dev.config_read(0x08, 4) == 0x0100_0001  # class 01/00/00, revision 1
    assert dev.config_read(0x0E, 1) == 0  # header type 0, single function
    assert dev.config_read(0x2C, 4) == 0x0040_1AF4
    assert dev.config_read(0x3D, 1) == 1  # INTA#
    assert dev.config_read(0x34, 1) == 0 and not dev.config_read(0x06, 2) & 0x10  # no capabilities


def test_writing_ones_everywhere_changes_only_the_writable_bits() -> None:
    dev = Dev(bars=(MEM32,), intx_pin=1)
    before = bytes(dev.config.data)
    for offset in range(0, 0x1000, 4):
        dev.config_write(offset, 4, 0xFFFF_FFFF)
    after = bytes(dev.config.data)
    changed = {i for i in range(0x1000) if before[i] != after[i]}
    # command (its writable bits), cache line size, the BAR's address bits, the interrupt line.
    assert changed == {0x04, 0x05, 0x0C, 0x11, 0x12, 0x13, 0x3C}
    assert dev.config_read(0x04, 2) == COMMAND_WRITABLE
    assert dev.config_read(0x00, 4) == 0x1042_1AF4
    assert dev.config_read(0x10, 4) == 0xFFFF_F000  # sized
    assert dev.config_read(0x30, 4) == 0  # no expansion ROM: its BAR sizes to nothing


def test_status_error_bits_clear_when_written_with_ones_and_the_rest_stays() -> None:
    dev = Dev()
    dev.config.add_capability(0x09, b"\0\0")
    dev.config.set_bits(0x06, 2, 0x8000 | 0x0100, True)  # detected parity error, master data parity error
    dev.config_write(0x06, 2, 0x8000)
    assert dev.config_read(0x06, 2) == 0x0100 | 0x10  # one error left, capability list untouched
    dev.config_write(0x06, 2, 0xFFFF)
    assert dev.config_read(0x06, 2) == 0x10


# --- BAR sizing (PCI 3.0 §6.2.5.1) ---


@pytest.mark.parametrize(
    ("bar", "after_ones"),
    [
        (Bar(0, 0x1000), [0xFFFF_F000]),
        (Bar(0, 0x10, prefetchable=True), [0xFFFF_FFF8]),  # prefetchable flag survives
        (Bar(0, 0x4000, BarKind.MEM64), [0xFFFF_C004, 0xFFFF_FFFF]),
        (Bar(0, 1 << 33, BarKind.MEM64, prefetchable=True), [0x0000_000C, 0xFFFF_FFFE]),
        (Bar(0, 0x20, BarKind.IO), [0x0000_FFE1]),  # 16-bit decode: the high half reads zero
    ],
)
def test_bar_sizing_reads_back_the_size_mask_and_the_flags(bar: Bar, after_ones: list[int]) -> None:
    dev = Dev(bars=(bar,))
    for reg in bar.registers:
        dev.config_write(reg, 4, 0xFFFF_FFFF)
    assert [dev.config_read(reg, 4) for reg in bar.registers] == after_ones


def test_bad_bar_definitions_are_refused() -> None:
    with pytest.raises(ConfigError, match="not a power of two"):
        Bar(0, 0x3000)
    with pytest.raises(ConfigError, match="index 0-4"):
        Bar(5, 0x1000, BarKind.MEM64)
    with pytest.raises(ConfigError, match="4 to 256 bytes"):
        Bar(0, 0x1000, BarKind.IO)
    with pytest.raises(ConfigError, match="BARs overlap"):
        Dev(bars=(Bar(0, 0x1000, BarKind.MEM64), Bar(1, 0x1000)))
    with pytest.raises(ConfigError, match="not aligned"):
        Dev(bars=(MEM32,)).program_bar(0, 0xC000_0800)


# --- where BARs decode, and the region tree following ---


def test_a_bar_decodes_only_while_the_command_register_enables_its_space() -> None:
    dev, mem, io = attached(MEM32, IO)
    dev.config_write(0x10, 4, 0xC000_1000)
    dev.config_write(0x20, 4, 0x1100)
    assert mem.take() == [] and io.take() == []
    dev.config_write(0x04, 2, COMMAND_MEMORY)
    assert mem.take() == [("add", 0xC000_1000, 0x1000, "dev-bar0", 0)] and io.take() == []
    dev.config_write(0x04, 2, COMMAND_MEMORY | COMMAND_IO)
    assert io.take() == [("add", 0x1100, 0x20, "dev-bar4", 0)] and mem.take() == []
    dev.config_write(0x04, 2, 0)
    assert mem.take() == [("del", 0xC000_1000, 0x1000, "dev-bar0", 0)]
    assert io.take() == [("del", 0x1100, 0x20, "dev-bar4", 0)]
    assert dev.bar_address(0) is None


def test_a_bar_moved_while_decoding_moves_its_region() -> None:
    dev, mem, _ = attached(MEM32)
    dev.program_bar(0, 0xC000_0000)
    dev.config_write(0x04, 2, COMMAND_MEMORY)
    mem.take()
    dev.config_write(0x10, 4, 0xC123_4000)
    assert mem.take() == [
        ("del", 0xC000_0000, 0x1000, "dev-bar0", 0),
        ("add", 0xC123_4000, 0x1000, "dev-bar0", 0),
    ]
    assert dev.bar_address(0) == 0xC123_4000


def test_a_64_bit_bar_moves_with_each_half() -> None:
    dev, mem, _ = attached(MEM64)
    dev.program_bar(2, 1 << 36)
    dev.config_write(0x04, 2, COMMAND_MEMORY)
    assert mem.take() == [("add", 1 << 36, 0x4000, "dev-bar2", 0)]
    dev.config_write(0x18, 4, 0x0001_0000)  # low half first, as Linux writes it
    dev.config_write(0x1C, 4, 0x10)  # the high half it already had: no move
    assert mem.take() == [
        ("del", 1 << 36, 0x4000, "dev-bar2", 0),
        ("add", 0x10_0001_0000, 0x4000, "dev-bar2", 0),
    ]
    dev.config_write(0x1C, 4, 0x11)
    assert mem.take() == [
        ("del", 0x10_0001_0000, 0x4000, "dev-bar2", 0),
        ("add", 0x11_0001_0000, 0x4000, "dev-bar2", 0),
    ]
    assert dev.bar_address(2) == 0x11_0001_0000


def test_sizing_while_decoding_unmaps_the_bar_and_restoring_maps_it_again() -> None:
    dev, mem, _ = attached(MEM32)
    dev.program_bar(0, 0xC000_2000)
    dev.config_write(0x04, 2, COMMAND_MEMORY)
    mem.take()
    dev.config_write(0x10, 4, 0xFFFF_FFFF)  # the sizing pattern is never a placement
    assert mem.take() == [("del", 0xC000_2000, 0x1000, "dev-bar0", 0)]
    assert dev.config_read(0x10, 4) == 0xFFFF_F000
    dev.config_write(0x10, 4, 0xC000_2000)
    assert mem.take() == [("add", 0xC000_2000, 0x1000, "dev-bar0", 0)]


@pytest.mark.parametrize(
    ("bar", "values"),
    [
        (MEM32, [0x0]),  # unassigned
        (MEM32, [0xFFFF_F000]),  # reaches the top of the 32-bit space
        (MEM64, [0xFFFF_C000, 0xFFFF_FFFF]),  # reaches the top of the 64-bit space
        (IO, [0xFFE0]),  # reaches the top of the port space
        (IO, [0x0]),
    ],
)
def test_bars_that_name_no_placement_decode_nowhere(bar: Bar, values: list[int]) -> None:
    dev, mem, io = attached(bar)
    for reg, value in zip(bar.registers, values, strict=True):
        dev.config_write(reg, 4, value)
    dev.config_write(0x04, 2, COMMAND_MEMORY | COMMAND_IO)
    assert dev.bar_address(bar.index) is None
    assert mem.take() == [] and io.take() == []


def test_a_bar_outside_the_windows_decodes_but_the_guest_sees_nothing() -> None:
    dev, mem, _ = attached(MEM32)
    dev.config_write(0x10, 4, 0x0010_0000)  # where RAM would be: not in a PCI hole
    dev.config_write(0x04, 2, COMMAND_MEMORY)
    assert dev.bar_address(0) == 0x0010_0000
    assert mem.take() == []


def test_overlapping_bars_of_two_devices_the_last_moved_is_seen() -> None:
    _, _, pci_mem, pci_io, mem, _ = board()
    a, b = Dev("a", (MEM32,)), Dev("b", (MEM32,))
    a.attach(pci_mem, pci_io)
    b.attach(pci_mem, pci_io)
    for dev in (a, b):
        dev.config_write(0x10, 4, 0xC000_0000)
        dev.config_write(0x04, 2, COMMAND_MEMORY)
    mem.take()
    assert a.bar_address(0) == b.bar_address(0) == 0xC000_0000
    a.config_write(0x10, 4, 0xC000_0000)  # rewritten, not moved: b stays on top
    assert mem.take() == []
    b.config_write(0x10, 4, 0xC000_8000)
    assert mem.take() == [
        ("del", 0xC000_0000, 0x1000, "b-bar0", 0),
        ("add", 0xC000_0000, 0x1000, "a-bar0", 0),
        ("add", 0xC000_8000, 0x1000, "b-bar0", 0),
    ]


def test_detach_unmaps_every_bar() -> None:
    dev, mem, io = attached(MEM32, IO)
    dev.program_bar(0, 0xC000_0000)
    dev.program_bar(4, 0x2000)
    dev.config_write(0x04, 2, COMMAND_MEMORY | COMMAND_IO)
    mem.take(), io.take()
    dev.detach()
    assert mem.take() == [("del", 0xC000_0000, 0x1000, "dev-bar0", 0)]
    assert io.take() == [("del", 0x2000, 0x20, "dev-bar4", 0)]
    dev.config_write(0x10, 4, 0xC000_4000)  # a late write to a detached function goes nowhere
    assert mem.take() == []


def test_a_listener_failure_leaves_the_bar_where_the_tree_put_it_and_the_vmm_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    system, _, pci_mem, pci_io, _, _ = board()
    system.add_listener(FailingListener())
    dev = Dev(bars=(MEM32,))
    dev.attach(pci_mem, pci_io)
    dev.config_write(0x10, 4, 0xC000_0000)
    with caplog.at_level(logging.WARNING, logger="evmm"):
        dev.config_write(0x04, 2, COMMAND_MEMORY)
    assert "dev: BAR 0 at 3221225472: no slot for dev-bar0" in caplog.text
    assert dev.bar_address(0) == 0xC000_0000  # the tree holds it; the other listeners saw it


# --- config space accesses of any shape ---


@settings(max_examples=300, deadline=None)
@given(st.integers(-8, 0x1008), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1))
def test_any_access_anywhere_keeps_the_read_only_bits_and_never_raises(
    offset: int, size: int, value: int
) -> None:
    dev = Dev(bars=(MEM32, MEM64), intx_pin=1)
    read_only = [
        (i, b)
        for i, b in enumerate(dev.config.data)
        if not dev.config.writable[i] and not dev.config.clear_on_write[i]
    ]
    dev.config_write(offset, size, value)
    dev.config_read(offset, size)
    assert all(dev.config.data[i] == b for i, b in read_only)


def test_reads_past_the_end_of_config_space_are_zero_bytes() -> None:
    cfg = ConfigSpace()
    cfg.set(0xFFE, 2, 0xBEEF)
    assert cfg.read(0xFFE, 4) == 0xBEEF
    assert cfg.read(0x1000, 4) == 0


def test_byte_writes_to_a_bar_assemble_an_address() -> None:
    dev, mem, _ = attached(MEM32)
    dev.config_write(0x04, 2, COMMAND_MEMORY)
    for i, byte in enumerate((0x00, 0x30, 0x00, 0xC0)):
        dev.config_write(0x10 + i, 1, byte)
    assert dev.bar_address(0) == 0xC000_3000
    assert mem.take()[-1] == ("add", 0xC000_3000, 0x1000, "dev-bar0", 0)


# --- capabilities (§6.7) ---


def test_capabilities_chain_from_the_pointer_dword_aligned() -> None:
    cfg = ConfigSpace()
    first = cfg.add_capability(0x09, b"\x07\x08\x09")  # vendor specific, 5 bytes
    second = cfg.add_capability(0x11, bytes(10), writable=b"\0\xc0")
    assert (first, second) == (0x40, 0x48)
    assert cfg.read(0x34, 1) == 0x40 and cfg.read(0x06, 2) & 0x10
    assert cfg.read(0x40, 4) == 0x0807_4809  # ID 09, next 0x48, body 07 08
    assert cfg.read(0x49, 1) == 0  # end of the chain
    assert cfg.capabilities() == [(0x40, 0x09), (0x48, 0x11)]
    cfg.write(0x4A, 2, 0xFFFF)
    assert cfg.read(0x4A, 2) == 0xC000  # only the bits the capability made writable
    with pytest.raises(ConfigError, match="does not fit"):
        cfg.add_capability(0x09, bytes(200))


# --- INTx ---


def test_intx_follows_the_device_unless_disabled_and_status_shows_it() -> None:
    _, _, pci_mem, pci_io, _, _ = board()
    line = RecordingIrqLine()
    dev = Dev(intx_pin=1)
    dev.attach(pci_mem, pci_io, line)
    dev.set_intx(True)
    assert line.level and dev.config_read(0x06, 2) & 0x08
    dev.config_write(0x04, 2, COMMAND_INTX_DISABLE)
    assert not line.level and dev.config_read(0x06, 2) & 0x08  # still pending in the status register
    dev.config_write(0x04, 2, 0)
    assert line.level
    dev.set_intx(False)
    assert line.changes == [True, False, True, False]
    dev.set_intx(True)
    dev.detach()
    assert not line.level
