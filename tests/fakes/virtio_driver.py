"""The driver side of virtio, for testing devices without a guest: rings in a fake guest memory, and a driver
that brings a device up through the virtio-mmio registers exactly as Linux's virtio_mmio.c does, or hands it
its queues and a recording interrupt directly, with no transport at all (``DirectDriver``).
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from dataclasses import dataclass

from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.chain import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, Activation, VirtioDevice
from evmm.devices.virtio.kicks import Kicks
from evmm.devices.virtio.mmio import NotifyRegistrar, VirtioMmio
from evmm.devices.virtio.queue import QueueConfig, Virtqueue
from evmm.memory import GuestMemory
from tests.fakes.irq import RecordingInterrupt, RecordingVirtioInterrupt

MEM_SIZE = 16 << 20
RING_BASE = 0x10000
DATA_BASE = 0x100000


def new_memory() -> GuestMemory:
    return GuestMemory.anonymous([(0, MEM_SIZE)])


@dataclass
class Used:
    head: int
    length: int
    data: bytes = b""  # what the device wrote into the chain's writable buffers, up to length


class Allocator:
    """Bump allocator for data buffers in the fake guest memory."""

    def __init__(self, base: int = DATA_BASE, end: int = MEM_SIZE) -> None:
        self.next = base
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            self.next = DATA_BASE  # wrap: tests never hold that much at once
            addr = self.next
        self.next = addr + max(size, 1)
        return addr


class DriverQueue:
    """One split virtqueue as the driver sees it."""

    def __init__(self, mem: GuestMemory, base: int, size: int, alloc: Allocator) -> None:
        self.mem = mem
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.alloc = alloc
        mem.fill(base, self.used + 6 + 8 * size - base)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.buffers: dict[int, list[tuple[int, int, bool]]] = {}
        self.slots: dict[int, list[int]] = {}  # descriptor slots each in-flight chain holds
        self.in_flight: Counter[int] = Counter()  # heads made available and not yet used (a hostile test
        # driver may post one head twice)

    @property
    def end(self) -> int:
        return self.used + 6 + 8 * self.size

    def _write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        """Post a chain of readable buffers (their bytes) then writable ones (their sizes); returns the head."""
        bufs: list[tuple[int, int, bool]] = []
        for data in readable:
            addr = self.alloc.alloc(len(data))
            self.mem.write(addr, data)
            bufs.append((addr, len(data), False))
        for n in writable:
            addr = self.alloc.alloc(n)
            self.mem.fill(addr, n, 0xEE)
            bufs.append((addr, n, True))
        if indirect:
            table = self.alloc.alloc(16 * len(bufs))
            for i, (addr, n, w) in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i < len(bufs) - 1 else 0)
                self._write_desc(table, i, addr, n, flags, i + 1)
            head = self.free.pop(0)
            self._write_desc(self.desc, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.slots[head] = [head]
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for k, (addr, n, w) in enumerate(bufs):
                nxt = ids[k + 1] if k + 1 < len(ids) else 0
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if k + 1 < len(ids) else 0)
                self._write_desc(self.desc, ids[k], addr, n, flags, nxt)
            head = ids[0]
            self.slots[head] = ids
        self.buffers[head] = bufs
        self.publish(head)
        return head

    def add_raw(self, descriptors: list[tuple[int, int, int, int]], head: int = 0) -> int:
        """Write descriptors verbatim (addr, len, flags, next) from slot 0, hostile chains included."""
        for i, (addr, n, flags, nxt) in enumerate(descriptors):
            self._write_desc(self.desc, i, addr, n, flags, nxt)
        self.buffers[head] = []
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.in_flight[head] += 1
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write_u16(self.avail + 2, idx & 0xFFFF)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, idx)

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write_u16(self.avail, 1 if on else 0)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def get_used(self) -> list[Used]:
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            # What Linux's virtqueue_get_buf checks before it trusts a used element (BAD_RING otherwise).
            assert head < self.size, f"used id {head} out of range"
            assert self.in_flight[head] > 0, f"used id {head} is not a head (not in flight)"
            self.in_flight[head] -= 1
            out.append(Used(head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            out[-1].data = self.written(head, length)
            self.buffers.pop(head, None)
            self.free.extend(self.slots.pop(head, []))
        return out

    def written(self, head: int, used_len: int) -> bytes:
        """The bytes the device wrote into a chain's writable buffers (call before get_used releases it)."""
        out = b""
        for addr, n, w in self.buffers.get(head, []):
            if w:
                out += self.mem.read(addr, n)
        return out[:used_len]


class MmioDriver:
    """Brings a device up through a ``VirtioMmio`` transport, the way Linux's virtio_mmio driver does."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        loop: asyncio.AbstractEventLoop,
        features: int | None = None,
        mem: GuestMemory | None = None,
        notify: NotifyRegistrar | None = None,
    ) -> None:
        self.mem = mem or new_memory()
        self.irq = RecordingInterrupt()
        # ``notify``: queue kicks by ioeventfd, as with KVM (tests/fakes/vhost.py has one); without it every
        # QueueNotify write is trapped.
        self.transport = VirtioMmio(device, self.mem, self.irq, loop, base=0xD0000000, notify=notify)
        self.alloc = Allocator()
        self.queues: list[DriverQueue] = []
        self.wanted = features

    def r(self, off: int) -> int:
        return self.transport.read(off, 4)

    def w(self, off: int, value: int) -> None:
        self.transport.write(off, 4, value)

    def device_features(self) -> int:
        self.w(regs.DEVICE_FEATURES_SEL, 0)
        lo = self.r(regs.DEVICE_FEATURES)
        self.w(regs.DEVICE_FEATURES_SEL, 1)
        return lo | (self.r(regs.DEVICE_FEATURES) << 32)

    def bring_up(self, queue_size: int = 256, *, event_idx: bool = True) -> int:
        assert self.r(regs.MAGIC_VALUE) == regs.MAGIC and self.r(regs.VERSION_REG) == 2
        self.w(regs.STATUS, 0)
        self.w(regs.STATUS, regs.ACKNOWLEDGE)
        self.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER)
        offered = self.device_features()
        feats = offered if self.wanted is None else offered & self.wanted
        feats |= VIRTIO_F_VERSION_1
        if not event_idx:
            feats &= ~VIRTIO_F_EVENT_IDX
        for sel in (0, 1):
            self.w(regs.DRIVER_FEATURES_SEL, sel)
            self.w(regs.DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFFFFFF)
        self.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK)
        assert self.r(regs.STATUS) & regs.FEATURES_OK, "device refused the features"
        base = 0x10000
        for i in range(len(self.transport.device.queue_sizes)):
            self.w(regs.QUEUE_SEL, i)
            size = min(queue_size, self.r(regs.QUEUE_NUM_MAX))
            q = DriverQueue(self.mem, base, size, self.alloc)
            base = (q.end + 4095) & ~4095
            self.w(regs.QUEUE_NUM, size)
            for lo, hi, addr in (
                (regs.QUEUE_DESC_LOW, regs.QUEUE_DESC_HIGH, q.desc),
                (regs.QUEUE_DRIVER_LOW, regs.QUEUE_DRIVER_HIGH, q.avail),
                (regs.QUEUE_DEVICE_LOW, regs.QUEUE_DEVICE_HIGH, q.used),
            ):
                self.w(lo, addr & 0xFFFFFFFF)
                self.w(hi, addr >> 32)
            self.w(regs.QUEUE_READY, 1)
            self.queues.append(q)
        self.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK | regs.DRIVER_OK)
        return feats

    def kick(self, index: int) -> None:
        self.w(regs.QUEUE_NOTIFY, index)

    @property
    def ctx(self) -> Activation:
        """What the device was given at DRIVER_OK (its interrupt, its queues)."""
        ctx = self.transport.device.ctx
        assert ctx is not None, "the device is not activated"
        return ctx

    def config(self, offset: int, size: int) -> int:
        return self.transport.read(regs.CONFIG + offset, size)

    def ack_interrupt(self) -> int:
        status = self.r(regs.INTERRUPT_STATUS)
        self.w(regs.INTERRUPT_ACK, status)
        return status


class DirectDriver:
    """Activates a device with no transport: the queues, a ``RecordingVirtioInterrupt`` and notifications
    delivered by ``kick`` straight to ``queue_notify``.  What a device gets here is all any transport gives."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        loop: asyncio.AbstractEventLoop,
        features: int | None = None,
        queue_size: int = 256,
        mem: GuestMemory | None = None,
    ) -> None:
        self.device = device
        self.mem = mem or new_memory()
        self.interrupt = RecordingVirtioInterrupt()
        self.alloc = Allocator()
        self.features = (device.features() if features is None else features) | VIRTIO_F_VERSION_1
        event_idx = bool(self.features & VIRTIO_F_EVENT_IDX)
        self.queues: list[DriverQueue] = []
        rings: list[Virtqueue | None] = []
        base = RING_BASE
        for i, max_size in enumerate(device.queue_sizes):
            q = DriverQueue(self.mem, base, min(queue_size, max_size), self.alloc)
            base = (q.end + 4095) & ~4095
            self.queues.append(q)
            cfg = QueueConfig(size=q.size, desc_addr=q.desc, avail_addr=q.avail, used_addr=q.used, ready=True)
            rings.append(Virtqueue(i, cfg, self.mem, event_idx=event_idx))
        self.kicks = Kicks(loop, len(rings), device.queue_notify)
        device.activate(
            Activation(
                mem=self.mem,
                queues=tuple(rings),
                interrupt=self.interrupt,
                kicks=self.kicks,
                reactor=loop,
                features=self.features,
            )
        )

    def kick(self, index: int) -> None:
        if not self.kicks.notified(index):
            self.device.queue_notify(index)

    def close(self) -> None:
        self.device.reset()
        self.kicks.close()
        self.interrupt.close()
