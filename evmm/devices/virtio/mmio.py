"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): a register file in front of a ``VirtioDevice``.

Runs on the reactor: register accesses arrive through the vCPU exit channel, queue kicks through ioeventfds
(one per queue, KVM matching the queue index written to QueueNotify, so a kick never exits to userspace), and
interrupts leave through an irqfd.  A device may hand a queue to a backend outside evmm (vhost): the queue's
ioeventfd becomes the backend's kick, and the backend's call eventfd is read here and becomes an interrupt.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Protocol

from evmm.devices.irq import Interrupt
from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, DeviceContext, VirtioDevice
from evmm.devices.virtio.queue import QueueBroken, QueueConfig, Virtqueue, check_queue_config
from evmm.log import log
from evmm.memory import GuestMemory

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D4D5645  # "EVMM"

# Register offsets (§4.2.2).
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (§2.1).
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# InterruptStatus bits (§4.2.2).
INT_VRING = 1
INT_CONFIG = 2


class NotifyRegistrar(Protocol):
    """Registers an eventfd that KVM signals when the guest writes ``datamatch`` (4 bytes) at ``addr``."""

    def add(self, addr: int, datamatch: int) -> int: ...

    def remove(self, addr: int, datamatch: int, fd: int) -> None: ...


class VirtioMmio:
    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        interrupt: Interrupt,
        reactor: asyncio.AbstractEventLoop,
        base: int,
        notify: NotifyRegistrar | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.device = device
        self.base = base
        self._mem = mem
        self._interrupt = interrupt
        self._reactor = reactor
        self._notify = notify
        self._on_error = on_error
        self._kick_fds: list[int] = []
        self._handed_kicks: dict[int, int] = {}  # queue -> kick eventfd a device handed to its backend
        self._call_fds: dict[int, int] = {}  # queue -> eventfd a backend writes to interrupt the driver
        # InterruptStatus is read and acknowledged on vCPU threads (read_inline/write_inline) while the reactor
        # sets bits: every read-modify-write of it holds this lock, so no bit set by one is lost to the other.
        # (CPython 3.11 happens not to switch threads inside ``x |= y``; the language does not promise it.)
        self._isr_lock = threading.Lock()
        self._reset_state()
        if notify is not None:
            for i in range(len(device.queue_sizes)):
                fd = notify.add(base + QUEUE_NOTIFY, i)
                self._kick_fds.append(fd)
                reactor.add_reader(fd, self._on_kick_fd, i, fd)

    def _reset_state(self) -> None:
        for q in getattr(self, "active", []):
            if q is not None:
                q.release()
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.queues = [QueueConfig() for _ in self.device.queue_sizes]
        self.active: list[Virtqueue | None] = [None] * len(self.device.queue_sizes)
        with self._isr_lock:
            self.interrupt_status = 0
        self.config_generation = 0

    def replace_device(self, device: VirtioDevice) -> None:
        """Swap the backend of a slot (hot-replace): the driver sees a reset-and-config-change."""
        if len(device.queue_sizes) != len(self.device.queue_sizes):
            raise ValueError("a replacement device must have the same number of queues")
        self.device.reset()
        self._take_back_queues()
        self.device = device

    def describe(self) -> dict[str, object]:
        """Transport and queue state for query-vm (on the reactor, which owns all of it)."""
        queues = [None if q is None else q.status() for q in self.active]
        return {
            "virtio": {
                "device": self.device.name,
                "status": self.status,
                "driver_features": self.driver_features,
                "interrupt_status": self.interrupt_status,
                "queues": queues,
                **self.device.debug_state(),
            }
        }

    # ---- SplitDevice: the registers of Linux's interrupt handler, on the vCPU thread -------------------------

    def read_inline(self, offset: int, size: int) -> int | None:
        """InterruptStatus without a trip to the reactor: Linux's vm_interrupt reads it on every interrupt.

        A bit the reactor sets just after this read comes with its own interrupt (it triggers the irqfd after
        setting the bit), so the driver never misses one."""
        if offset == INTERRUPT_STATUS and size == 4:
            return self.interrupt_status
        return None

    def write_inline(self, offset: int, size: int, value: int) -> bool:
        """InterruptAck, the other half of every interrupt (§4.2.2)."""
        if offset == INTERRUPT_ACK and size == 4:
            self._clear_interrupt(value)
            return True
        return False

    def _set_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status |= bits

    def _clear_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status &= ~bits

    # ---- BusDevice ---------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG:
            return self._read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            return 0  # §4.2.2.2: the driver MUST use 32-bit accesses for registers
        dev = self.device
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return dev.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (
                (dev.features() >> (32 * self.device_features_sel)) & 0xFFFFFFFF
                if self.device_features_sel < 2
                else 0
            )
        if offset == QUEUE_NUM_MAX:
            return dev.queue_sizes[self.queue_sel] if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions (§4.2.2: length -1 means none)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, value.to_bytes(size, "little"))
            return
        if size != 4 or offset % 4:
            return
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & FEATURES_OK or self.driver_features_sel > 1:
                return
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self.kick(value)
        elif offset == INTERRUPT_ACK:
            self._clear_interrupt(value)
        elif offset == STATUS:
            self._write_status(value)
        elif q is not None and not self.status & DRIVER_OK:
            self._write_queue(q, offset, value)

    def _write_queue(self, q: QueueConfig, offset: int, value: int) -> None:
        if offset == QUEUE_NUM:
            q.size = value
        elif offset == QUEUE_READY:
            q.ready = bool(value & 1)
        elif offset == QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_addr = (q.avail_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_addr = (q.avail_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_addr = (q.used_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_addr = (q.used_addr & 0xFFFFFFFF) | (value << 32)

    def _read_config(self, offset: int, size: int) -> int:
        cfg = self.device.config()
        chunk = cfg[offset : offset + size]
        return int.from_bytes(chunk.ljust(size, b"\0"), "little") if offset < len(cfg) else 0

    # ---- status machine (§3.1.1) -------------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        log.debug("%s at %#x: status %#x -> %#x", self.device.name, self.base, self.status, value)
        if value == 0:
            self.device.reset()
            self._take_back_queues()
            self._reset_state()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.features()
            if self.driver_features & ~offered or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~FEATURES_OK  # the driver reads status back and gives up (§3.1.1 step 6)
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            if not value & FEATURES_OK:
                return
            self.status = value
            self._activate()
            return
        self.status = value

    def _activate(self, prepare: Callable[[Virtqueue], None] | None = None) -> None:
        """Build the queues and start the device; ``prepare`` sets each queue's indices first (a restore)."""
        event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        for i, cfg in enumerate(self.queues):
            if not cfg.ready:
                continue
            why = check_queue_config(cfg, self.device.queue_sizes[i], self._mem)
            if why is not None:
                self.set_needs_reset(f"queue {i}: {why}")
                return
            queue = Virtqueue(i, cfg, self._mem, event_idx=event_idx)
            if prepare is not None:
                prepare(queue)
            self.active[i] = queue
        log.debug(
            "%s at %#x: activated, features %#x, queues %s",
            self.device.name,
            self.base,
            self.driver_features,
            [(q.index, q.size) for q in self.active if q is not None],
        )
        ctx = DeviceContext(
            mem=self._mem,
            queues=list(self.active),
            reactor=self._reactor,
            features=self.driver_features,
            signal_used=self.signal_used,
            signal_config=self.signal_config,
            needs_reset=self.set_needs_reset,
            take_kick=self.take_kick,
            call_fd=self.call_fd,
        )
        self.device.activate(ctx)
        # A driver may queue buffers and kick before DRIVER_OK (Linux's virtio-rng requests entropy while it
        # probes); those kicks found no active device, so look at every queue once now.
        for q in self.active:
            if q is not None and q.has_available():
                self.kick(q.index)

    # ---- queue kicks ---------------------------------------------------------------------------------------

    def _on_kick_fd(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.kick(index)

    def kick(self, index: int) -> None:
        if not self.status & DRIVER_OK or self.status & DEVICE_NEEDS_RESET:
            return
        handed = self._handed_kicks.get(index)
        if handed is not None:
            # The queue is the backend's: a notification that reached us (no ioeventfd, or the driver's
            # buffers found at activation) is passed on.
            os.eventfd_write(handed, 1)
            return
        if 0 <= index < len(self.active) and self.active[index] is not None:
            try:
                self.device.queue_notify(index)
            except QueueBroken as e:
                self.set_needs_reset(str(e))

    # ---- queues served outside evmm (vhost) -----------------------------------------------------------------

    def take_kick(self, index: int) -> int:
        """Hand queue ``index``'s notifications to a backend until reset (``DeviceContext.take_kick``).

        With KVM it is the queue's ioeventfd itself, which the reactor stops reading: a kick then goes from the
        guest's QueueNotify write to the backend with no exit and no reactor wake.  Without an ioeventfd (unit
        tests) it is a fresh eventfd that ``kick`` writes.
        """
        if not 0 <= index < len(self.device.queue_sizes):
            raise QueueBroken(f"queue {index} does not exist")
        fd = self._handed_kicks.get(index)
        if fd is not None:
            return fd
        if self._kick_fds:
            fd = self._kick_fds[index]
            self._reactor.remove_reader(fd)
        else:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._handed_kicks[index] = fd
        return fd

    def call_fd(self, index: int) -> int:
        """An eventfd for a backend's used-buffer notifications of queue ``index`` (``DeviceContext.call_fd``).

        It cannot be the irqfd: Linux's virtio-mmio handler (vm_interrupt) reads InterruptStatus and ignores
        the interrupt unless INT_VRING is set, and only we can set it.  So the reactor reads the eventfd, sets
        INT_VRING and triggers the irqfd: one reactor wake per interrupt, the price of an honest
        InterruptStatus (a sticky INT_VRING would let the backend write the irqfd directly, but the guest would
        then scan every queue on every interrupt, config changes included).  No EVENT_IDX check here: the
        backend applied the driver's used_event itself, and the Virtqueue's record of what was signalled knows
        nothing of the used entries the backend wrote.
        """
        if not 0 <= index < len(self.device.queue_sizes):
            raise QueueBroken(f"queue {index} does not exist")
        fd = self._call_fds.get(index)
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._call_fds[index] = fd
            self._reactor.add_reader(fd, self._on_call_fd, fd)
        return fd

    def _on_call_fd(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        if self.status & DRIVER_OK:
            self._set_interrupt(INT_VRING)
            self._interrupt.trigger()

    def _take_back_queues(self) -> None:
        """After the device's reset: its backend has let go of the eventfds (§2.4: the queues are gone)."""
        for index, fd in self._handed_kicks.items():
            if self._kick_fds:
                self._reactor.add_reader(fd, self._on_kick_fd, index, fd)
            else:
                os.close(fd)
        self._handed_kicks.clear()
        for fd in self._call_fds.values():
            self._reactor.remove_reader(fd)
            os.close(fd)
        self._call_fds.clear()

    # ---- interrupts ----------------------------------------------------------------------------------------

    def signal_used(self, index: int) -> None:
        q = self.active[index] if 0 <= index < len(self.active) else None
        if q is None or not q.needs_interrupt():
            return
        self._set_interrupt(INT_VRING)
        self._interrupt.trigger()

    def signal_config(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._set_interrupt(INT_CONFIG)
        self._interrupt.trigger()

    def set_needs_reset(self, reason: str) -> None:
        if self.status & DEVICE_NEEDS_RESET:
            return
        if self._on_error is not None:
            self._on_error(f"{self.device.name} at {self.base:#x}: {reason}; the device needs a reset")
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self.signal_config()

    def close(self) -> None:
        self.device.reset()
        self._take_back_queues()
        self.device.close()
        self._reset_state()
        for i, fd in enumerate(self._kick_fds):
            self._reactor.remove_reader(fd)
            if self._notify is not None:
                self._notify.remove(self.base + QUEUE_NOTIFY, i, fd)
        self._kick_fds.clear()
