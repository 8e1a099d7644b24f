"""Descriptor chains (virtio 1.2 §2.7.5 and §2.7.5.3 indirect descriptors), parsed with hostile input in mind.

A chain is checked whole before a device sees it: every buffer lies inside guest RAM, the chain is no longer
than the ring (so a NEXT loop ends), an indirect table is well-formed and not nested, and device-writable
buffers come after device-readable ones (§2.7.4.2).  Anything else is an ``InvalidChain`` for that one head.
"""

from __future__ import annotations

import struct

from evmm.errors import GuestMemoryError
from evmm.memory import GuestMemory
from evmm.record import record

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
_DESC = struct.Struct("<QIHH")
MAX_INDIRECT = 1024  # descriptors in one indirect table; Linux never uses more than the queue size
MAX_CHAIN_BYTES = 1 << 32  # a chain's total length must fit the used ring's 32-bit len


@record(frozen=True, slots=True)
class Descriptor:
    addr: int
    length: int
    writable: bool


@record(frozen=True, slots=True)
class InvalidChain:
    head: int
    reason: str


class DescriptorChain:
    """A validated chain: device-readable buffers, then device-writable ones."""

    __slots__ = ("descriptors", "head", "readable_len", "writable_len")

    def __init__(self, head: int, descriptors: list[Descriptor]) -> None:
        self.head = head
        self.descriptors = descriptors
        self.readable_len = sum(d.length for d in descriptors if not d.writable)
        self.writable_len = sum(d.length for d in descriptors if d.writable)

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.writable]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.writable]

    def read_all(self, mem: GuestMemory) -> bytes:
        """Gather every device-readable byte."""
        return b"".join(mem.read(d.addr, d.length) for d in self.descriptors if not d.writable)

    def readable_views(self, mem: GuestMemory) -> list[memoryview]:
        return [mem.view(d.addr, d.length) for d in self.descriptors if not d.writable]

    def writable_views(self, mem: GuestMemory) -> list[memoryview]:
        return [mem.view(d.addr, d.length) for d in self.descriptors if d.writable]

    def write(self, mem: GuestMemory, data: bytes | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers starting ``offset`` bytes in; returns bytes written."""
        done = 0
        pos = 0
        for d in self.descriptors:
            if not d.writable:
                continue
            if offset >= pos + d.length:
                pos += d.length
                continue
            start = max(offset - pos, 0)
            n = min(d.length - start, len(data) - done)
            if n <= 0:
                break
            mem.write(d.addr + start, data[done : done + n])
            done += n
            pos += d.length
        return done


def walk_chain(
    mem: GuestMemory, desc_table: memoryview, size: int, head: int
) -> DescriptorChain | InvalidChain:
    descs: list[Descriptor] = []
    total = 0
    seen_writable = False
    table = desc_table
    table_size = size
    index = head
    indirect = False
    steps = 0
    while True:
        steps += 1
        if steps > table_size:
            return InvalidChain(head, "descriptor chain loops or is longer than its table")
        addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
        if flags & VIRTQ_DESC_F_INDIRECT:
            # §2.7.5.3.1: only in the main table, not with NEXT, a whole number of descriptors.
            if indirect:
                return InvalidChain(head, "nested indirect descriptor table")
            if flags & VIRTQ_DESC_F_NEXT:
                return InvalidChain(head, "indirect descriptor with NEXT set")
            if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                return InvalidChain(head, f"indirect table length {length} is invalid")
            try:
                table = mem.view(addr, length)
            except GuestMemoryError:
                return InvalidChain(head, f"indirect table {addr:#x}+{length:#x} is outside guest RAM")
            table_size = length // 16
            indirect = True
            index = 0
            steps = 0
            continue
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if writable:
            seen_writable = True
        elif seen_writable:
            return InvalidChain(head, "device-readable descriptor after a device-writable one")
        if length and not mem.contains(addr, length):
            return InvalidChain(head, f"buffer {addr:#x}+{length:#x} is outside guest RAM")
        total += length
        if total >= MAX_CHAIN_BYTES:
            return InvalidChain(head, "chain length overflows 32 bits")
        descs.append(Descriptor(addr, length, writable))
        if not flags & VIRTQ_DESC_F_NEXT:
            return DescriptorChain(head, descs)
        if nxt >= table_size:
            return InvalidChain(head, f"next descriptor {nxt} is outside a table of {table_size}")
        index = nxt


__all__ = ["Descriptor", "DescriptorChain", "InvalidChain", "walk_chain"]
