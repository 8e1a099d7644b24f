"""The region tree's KVM listener on a real KVM: slices of host mappings at other guest addresses, read-only
slots, and slots deleted and made again as the tree changes, seen by a running guest."""

from __future__ import annotations

import mmap
import struct

from evmm.address_space import AddressSpace, Alias, Container, Ram, Rom
from evmm.address_space.listener import KvmListener
from tests.kvm.test_exits import PROGRAM, Recorder
from tests.kvm.tiny import RAM_SIZE, tiny_guest

WINDOW = (
    0x20000  # PROGRAM writes the word 0x1234 at WINDOW + 0x10 and stores the word at WINDOW + 0x20 at 0x502
)


def test_a_slice_of_another_mapping_shown_through_an_alias_is_guest_memory() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        vm = t.machine.parts.vm
        vm.delete_user_memory_region(0)  # the tiny guest's own slot: the tree maps it again, as slot 0
        backing = Ram("backing", mmap.mmap(-1, 0x4000))
        backing.buffer[0x1020:0x1022] = struct.pack("<H", 0xBEEF)
        space = AddressSpace("memory", Container("system", 1 << 32))
        space.add_listener(KvmListener(vm))
        with space.transaction():
            space.root.add(Ram("low", t.memory.regions[0].buffer), 0)
            space.root.add(Alias("window", backing, 0x1000, 0x1000), WINDOW)
        assert t.run().code == 7
        assert struct.unpack("<H", t.memory.read(0x502, 2))[0] == 0xBEEF
        assert struct.unpack_from("<H", backing.buffer, 0x1010)[0] == 0x1234  # landed at the slice's offset


def test_a_rom_reads_from_its_mapping_and_drops_writes_to_the_bus() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        vm = t.machine.parts.vm
        vm.delete_user_memory_region(0)
        rom = Rom("rom", mmap.mmap(-1, 0x1000))
        rom.buffer[0x20:0x22] = struct.pack("<H", 0xC0DE)
        mmio = Recorder()
        t.mmio.insert(WINDOW, 0x1000, mmio, "rom-writes")
        space = AddressSpace("memory", Container("system", 1 << 32))
        space.add_listener(KvmListener(vm))
        with space.transaction():
            space.root.add(Ram("low", t.memory.regions[0].buffer), 0)
            space.root.add(rom, WINDOW)
        assert t.run().code == 7
        assert struct.unpack("<H", t.memory.read(0x502, 2))[0] == 0xC0DE
        assert mmio.writes == [(0x10, 2, 0x1234)] and mmio.reads == []  # KVM_MEM_READONLY: a write exits
        assert rom.buffer[0x10:0x12] == b"\0\0"


def test_a_slot_removed_from_the_tree_is_gone_from_the_guest() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        vm = t.machine.parts.vm
        vm.delete_user_memory_region(0)
        space = AddressSpace("memory", Container("system", 1 << 32))
        space.add_listener(KvmListener(vm))
        backing = Ram("backing", mmap.mmap(-1, 0x1000))
        with space.transaction():
            space.root.add(Ram("low", t.memory.regions[0].buffer, size=RAM_SIZE), 0)
            space.root.add(backing, WINDOW)
        space.root.remove(backing)  # its slot deleted: the guest's accesses there exit to the (empty) bus
        assert t.run().code == 7
        assert t.memory.read(0x502, 2) == b"\xff\xff"
        assert backing.buffer[0x10:0x12] == b"\0\0"
