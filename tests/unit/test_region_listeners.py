"""What listeners are told when an address space changes, exactly, and what the KVM and bus listeners do."""

from __future__ import annotations

import mmap

import pytest

from evmm.address_space import AddressSpace, Alias, Container, Io, Ram, Rom
from evmm.address_space.listener import BusListener, KvmListener, page_trim
from evmm.devices.bus import Bus, OnVcpu
from evmm.errors import ConfigError, KvmError
from tests.fakes.address_space import FailingListener, RecordingListener, SlotRecordingVm

PAGE = mmap.PAGESIZE


class Regs:
    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class VcpuRegs(Regs):
    on_vcpu = OnVcpu(reads=frozenset({0x10, 0x110}), writes=frozenset({0x120}))


def space() -> tuple[AddressSpace, RecordingListener]:
    s = AddressSpace("memory", Container("system", 1 << 40))
    rec = RecordingListener()
    s.add_listener(rec)
    return s, rec


def test_adding_moving_and_removing_a_region_tells_exactly_what_changed() -> None:
    s, rec = space()
    bar = Io("bar", 0x1000, Regs())
    bar.add_ioeventfd(0x20, 4, fd=11, datamatch=3)
    s.root.add(bar, 0xC000_0000)
    assert rec.take() == [("add", 0xC000_0000, 0x1000, "bar", 0), ("fd+", 0xC000_0020, 4, "bar", 11)]
    s.root.move(bar, 0xC010_0000)
    # Gone first (ioeventfd, then range), then new (range, then ioeventfd): KVM never sees both at once.
    assert rec.take() == [
        ("fd-", 0xC000_0020, 4, "bar", 11),
        ("del", 0xC000_0000, 0x1000, "bar", 0),
        ("add", 0xC010_0000, 0x1000, "bar", 0),
        ("fd+", 0xC010_0020, 4, "bar", 11),
    ]
    s.root.remove(bar)
    assert rec.take() == [("fd-", 0xC010_0020, 4, "bar", 11), ("del", 0xC010_0000, 0x1000, "bar", 0)]


def test_only_the_ranges_that_changed_are_reported() -> None:
    s, rec = space()
    buf = mmap.mmap(-1, 0x10000)
    s.root.add(Ram("ram", buf), 0)
    s.root.add(Io("far", 0x100, Regs()), 0x100000)
    rec.take()
    cover = Io("cover", 0x1000, Regs())
    s.root.add(cover, 0x4000, priority=1)
    assert rec.take() == [
        ("del", 0, 0x10000, "ram", 0),
        ("add", 0, 0x4000, "ram", 0),
        ("add", 0x4000, 0x1000, "cover", 0),
        ("add", 0x5000, 0xB000, "ram", 0x5000),
    ]
    s.root.remove(cover)
    assert rec.take() == [
        ("del", 0, 0x4000, "ram", 0),
        ("del", 0x4000, 0x1000, "cover", 0),
        ("del", 0x5000, 0xB000, "ram", 0x5000),
        ("add", 0, 0x10000, "ram", 0),
    ]


def test_a_change_inside_an_aliased_container_reaches_the_space() -> None:
    s, rec = space()
    pci = Container("pci-mem", 1 << 40)
    s.root.add(Alias("hole", pci, 0xC000_0000, 0x1000_0000), 0xC000_0000)
    assert rec.take() == []
    bar = Io("bar", 0x1000, Regs())
    pci.add(bar, 0x1000)  # outside the hole
    assert rec.take() == []
    pci.move(bar, 0xC000_1000)
    assert rec.take() == [("add", 0xC000_1000, 0x1000, "bar", 0)]


def test_a_transaction_reports_only_the_net_change_once() -> None:
    s, rec = space()
    bar = Io("bar", 0x1000, Regs())
    s.root.add(bar, 0x1000)
    rec.take()
    with s.transaction():
        s.root.move(bar, 0x8000)
        s.root.move(bar, 0x1000)  # back where it was
        with s.transaction():
            s.root.add(Io("new", 0x10, Regs()), 0x9000)
        assert rec.take() == []  # nothing until the outermost transaction ends
    assert rec.take() == [("add", 0x9000, 0x10, "new", 0)]


def test_ioeventfd_changes_on_a_placed_region_are_reported() -> None:
    s, rec = space()
    regs = Io("regs", 0x100, Regs())
    s.root.add(regs, 0x1000)
    rec.take()
    regs.add_ioeventfd(0x50, 4, fd=5, datamatch=0)
    regs.add_ioeventfd(0x50, 4, fd=6, datamatch=1)
    regs.remove_ioeventfd(5)
    assert rec.take() == [
        ("fd+", 0x1050, 4, "regs", 5),
        ("fd+", 0x1050, 4, "regs", 6),
        ("fd-", 0x1050, 4, "regs", 5),
    ]
    with pytest.raises(ConfigError, match="no ioeventfd 5"):
        regs.remove_ioeventfd(5)


def test_a_late_listener_sees_everything_and_a_removed_one_undoes_it() -> None:
    s, _ = space()
    regs = Io("regs", 0x100, Regs())
    regs.add_ioeventfd(0, 2, fd=4)
    s.root.add(regs, 0x2000)
    late = RecordingListener()
    s.add_listener(late)
    assert late.take() == [("add", 0x2000, 0x100, "regs", 0), ("fd+", 0x2000, 2, "regs", 4)]
    s.remove_listener(late)
    assert late.take() == [("fd-", 0x2000, 2, "regs", 4), ("del", 0x2000, 0x100, "regs", 0)]
    s.root.remove(regs)
    assert late.take() == []


def test_a_failing_listener_does_not_stop_the_others_and_the_error_reaches_the_caller() -> None:
    s = AddressSpace("memory", Container("system", 1 << 20))
    failing, rec = FailingListener(), RecordingListener()
    s.add_listener(failing)
    s.add_listener(rec)
    with pytest.raises(KvmError, match="no slot for a"), s.transaction():  # the first error
        s.root.add(Io("a", 0x10, Regs()), 0)
        s.root.add(Io("b", 0x10, Regs()), 0x100)
    assert failing.take() == [("add", 0, 0x10, "a", 0), ("add", 0x100, 0x10, "b", 0)]  # tried both
    assert rec.take() == [("add", 0, 0x10, "a", 0), ("add", 0x100, 0x10, "b", 0)]
    assert [r.region.name for r in s.view.ranges] == ["a", "b"]


# --- KvmListener ---


def test_kvm_listener_gives_each_ram_piece_a_slot_and_frees_it() -> None:
    vm = SlotRecordingVm()
    s = AddressSpace("memory", Container("system", 1 << 40))
    s.add_listener(KvmListener(vm))
    low, high = mmap.mmap(-1, 0x100000), mmap.mmap(-1, 0x200000)
    with s.transaction():
        s.root.add(Ram("low", low), 0)
        s.root.add(Ram("high", high), 1 << 32)
        s.root.add(Rom("rom", mmap.mmap(-1, 0x10000)), 0xFFFF_0000)
    assert vm.slots == {
        0: (0, 0x100000, 0, False),
        1: (0xFFFF_0000, 0x10000, 0, True),  # KVM_MEM_READONLY
        2: (1 << 32, 0x200000, 0, False),
    }
    hole = Io("hole", 0x2000, Regs())
    s.root.add(hole, 0x10000, priority=1)
    # The low slot is deleted and its two halves take the free slots (0, then 3).
    assert vm.slots == {
        0: (0, 0x10000, 0, False),
        1: (0xFFFF_0000, 0x10000, 0, True),
        2: (1 << 32, 0x200000, 0, False),
        3: (0x12000, 0xEE000, 0x12000, False),
    }
    s.root.remove(hole)
    assert vm.slots[0] == (0, 0x100000, 0, False) and 3 not in vm.slots


def test_kvm_listener_trims_ram_to_whole_pages() -> None:
    assert page_trim(0x1010, 0x5010, 0x1000) == (0x2000, 0x5000)
    assert page_trim(0x1010, 0x1FF0, 0x1000) == (0x2000, 0x1000)  # empty
    vm = SlotRecordingVm()
    s = AddressSpace("memory", Container("system", 1 << 32))
    s.add_listener(KvmListener(vm))
    s.root.add(Ram("ram", mmap.mmap(-1, 4 * PAGE)), 0)
    s.root.add(Io("odd", 0x10, Regs()), PAGE + 0x100, priority=1)
    assert sorted(vm.slots.values()) == [
        (0, PAGE, 0, False),
        (2 * PAGE, 2 * PAGE, 2 * PAGE, False),  # the page holding the odd register is left to exits
    ]


def test_kvm_listener_maps_ram_seen_through_an_alias_at_the_right_buffer_offset() -> None:
    vm = SlotRecordingVm()
    s = AddressSpace("memory", Container("system", 1 << 40))
    s.add_listener(KvmListener(vm))
    ram = Ram("ram", mmap.mmap(-1, 0x400000))
    s.root.add(ram, 0)
    s.root.add(Alias("mirror", ram, 0x200000, 0x100000), 1 << 32)
    assert sorted(vm.slots.values()) == [(0, 0x400000, 0, False), (1 << 32, 0x100000, 0x200000, False)]


def test_kvm_listener_registers_ioeventfds_in_the_right_space() -> None:
    vm = SlotRecordingVm()
    pio = AddressSpace("io", Container("ports", 0x10000))
    pio.add_listener(KvmListener(vm, pio=True))
    regs = Io("regs", 0x20, Regs())
    regs.add_ioeventfd(0x10, 2, fd=9, datamatch=1)
    pio.root.add(regs, 0xC000)
    pio.root.remove(regs)
    assert vm.ioeventfds == [("add", 9, 0xC010, 2, 1, True), ("del", 9, 0xC010, 2, 1, True)]
    with pytest.raises(ConfigError, match="RAM cannot be mapped in the port I/O space"):
        pio.root.add(Ram("ram", mmap.mmap(-1, PAGE)), 0)


def test_kvm_listener_says_when_slots_run_out() -> None:
    vm = SlotRecordingVm()
    s = AddressSpace("memory", Container("system", 1 << 32))
    s.add_listener(KvmListener(vm, max_slots=1))
    s.root.add(Ram("a", mmap.mmap(-1, PAGE)), 0)
    with pytest.raises(ConfigError, match="b: all 1 KVM memory slots are in use"):
        s.root.add(Ram("b", mmap.mmap(-1, PAGE)), 0x10000)


# --- BusListener ---


def test_bus_listener_mirrors_the_io_ranges_with_device_offsets() -> None:
    bus = Bus("mmio")
    s = AddressSpace("memory", Container("system", 1 << 32))
    s.add_listener(BusListener(bus))
    regs = VcpuRegs()
    s.root.add(Io("regs", 0x1000, regs), 0x10000)
    s.root.add(Ram("ram", mmap.mmap(-1, PAGE)), 0)  # not on the bus
    assert [(m.base, m.length, m.name, m.on_vcpu) for m in bus.mappings()] == [
        (0x10000, 0x1000, "regs", VcpuRegs.on_vcpu)
    ]
    assert bus.read(0x10040, 4) == 0x40
    cover = Io("cover", 0x100, Regs())
    s.root.add(cover, 0x10000, priority=1)
    # The visible rest of regs starts 0x100 into it: the device still sees its own offsets.
    assert [(m.base, m.length, m.name) for m in bus.mappings()] == [
        (0x10000, 0x100, "cover"),
        (0x10100, 0xF00, "regs"),
    ]
    assert bus.read(0x10140, 4) == 0x140
    shifted = bus.find(0x10110)
    assert shifted is not None
    # Which thread serves a register follows the offsets: 0x110 and 0x120 of the device are 0x10 and 0x20 here.
    assert shifted.on_vcpu == OnVcpu(reads=frozenset({0x10}), writes=frozenset({0x20}))
    s.root.move(cover, 0x20000)
    assert [(m.base, m.name) for m in bus.mappings()] == [(0x10000, "regs"), (0x20000, "cover")]
    assert bus.read(0x10010, 4) == 0x10
