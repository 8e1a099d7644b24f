"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): a register file in front of a ``VirtioDevice``.

Runs on the reactor: register accesses arrive through the vCPU exit channel, queue kicks through ioeventfds
(one per queue, KVM matching the queue index written to QueueNotify, so a kick never exits to userspace), and
interrupts leave through an irqfd.  Two registers are served on the vCPU thread instead (``on_vcpu``):
InterruptStatus and InterruptAck, which Linux's interrupt handler (vm_interrupt) reads and writes on every
interrupt; they touch nothing but the interrupt status, under its own lock.  A device may hand a queue to a backend outside evmm (vhost): the queue's
ioeventfd becomes the backend's kick, and the backend signals the driver through the device's irqfd itself
(see ``_call_fd``).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Protocol

from evmm.devices.bus import OnVcpu
from evmm.devices.irq import Interrupt
from evmm.devices.virtio.device import (
    CONFIG_CHANGE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    Activation,
    VirtioDevice,
)
from evmm.devices.virtio.kicks import Kicks
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


class _Interrupt:
    """The ``VirtioInterrupt`` of one activation: InterruptStatus bits and the irqfd, until the device's reset."""

    def __init__(self, transport: VirtioMmio) -> None:
        self._transport: VirtioMmio | None = transport

    def trigger(self, source: int) -> None:
        t = self._transport
        if t is not None:
            t._interrupt_driver(INT_CONFIG if source == CONFIG_CHANGE else INT_VRING)

    def notifier(self, queue: int) -> int:
        t = self._transport
        if t is None:
            raise QueueBroken("the device was reset")
        return t._call_fd(queue)

    def needs_reset(self, reason: str) -> None:
        t = self._transport
        if t is not None:
            t._needs_reset(reason)

    def revoke(self) -> None:
        self._transport = None


class VirtioMmio:
    on_vcpu = OnVcpu(reads=frozenset({INTERRUPT_STATUS}), writes=frozenset({INTERRUPT_ACK}))

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
        self._irq = interrupt
        self._reactor = reactor
        self._notify = notify
        self._on_error = on_error
        self._active_interrupt: _Interrupt | None = None  # the device's, while it is activated
        self._call_fds: dict[int, int] = {}  # queue -> eventfd a backend writes to interrupt the driver
        self._direct_calls = 0  # queues whose backend writes the irqfd itself: INT_VRING is then reported
        # InterruptStatus is read and acknowledged on vCPU threads (on_vcpu) while the reactor sets bits: every
        # read-modify-write of it holds this lock, so no bit set by one is lost to the other.  (CPython 3.11
        # happens not to switch threads inside ``x |= y``; the language does not promise it.)
        self._isr_lock = threading.Lock()
        self._reset_state()
        count = len(device.queue_sizes)
        eventfds = [notify.add(base + QUEUE_NOTIFY, i) for i in range(count)] if notify is not None else []
        self._kicks = Kicks(reactor, count, self.kick, eventfds)

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

    # ---- interrupt status: read and acknowledged on vCPU threads, set on the reactor ----------------------

    def _set_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status |= bits

    def _clear_interrupt(self, bits: int) -> None:
        with self._isr_lock:
            self.interrupt_status &= ~bits

    # ---- BusDevice ---------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == INTERRUPT_STATUS:
            # On the vCPU thread (on_vcpu): nothing but the status word, which a reader sees whole.  A bit the
            # reactor sets just after this read comes with its own interrupt (it triggers the irqfd after
            # setting the bit), so the driver never misses one.
            if size != 4:
                return 0  # §4.2.2.2: 32-bit accesses only
            return self.interrupt_status | (INT_VRING if self._direct_calls else 0)
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
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions (§4.2.2: length -1 means none)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == INTERRUPT_ACK:
            if size == 4:  # on the vCPU thread (on_vcpu), under the status lock
                self._clear_interrupt(value)
            return
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
            self._release_device()
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

    def _activate(self) -> None:
        event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        for i, cfg in enumerate(self.queues):
            if not cfg.ready:
                continue
            why = check_queue_config(cfg, self.device.queue_sizes[i], self._mem)
            if why is not None:
                self._needs_reset(f"queue {i}: {why}")
                return
            self.active[i] = Virtqueue(i, cfg, self._mem, event_idx=event_idx)
        log.debug(
            "%s at %#x: activated, features %#x, queues %s",
            self.device.name,
            self.base,
            self.driver_features,
            [(q.index, q.size) for q in self.active if q is not None],
        )
        self._active_interrupt = _Interrupt(self)
        ctx = Activation(
            mem=self._mem,
            queues=tuple(self.active),
            interrupt=self._active_interrupt,
            kicks=self._kicks,
            reactor=self._reactor,
            features=self.driver_features,
        )
        self.device.activate(ctx)
        # A driver may queue buffers and kick before DRIVER_OK (Linux's virtio-rng requests entropy while it
        # probes); those kicks found no active device, so look at every queue once now.
        for q in self.active:
            if q is not None and q.has_available():
                self.kick(q.index)

    # ---- queue kicks ---------------------------------------------------------------------------------------

    def kick(self, index: int) -> None:
        if not self.status & DRIVER_OK or self.status & DEVICE_NEEDS_RESET:
            return
        if self._kicks.notified(index):
            return  # the queue is a backend's: it got the notification
        if 0 <= index < len(self.active) and self.active[index] is not None:
            try:
                self.device.queue_notify(index)
            except QueueBroken as e:
                self._needs_reset(str(e))

    # ---- interrupts: what the device's VirtioInterrupt does -------------------------------------------------

    def _interrupt_driver(self, bits: int) -> None:
        if bits & INT_CONFIG:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF  # §2.5.1, §4.2.2
        self._set_interrupt(bits)
        self._irq.trigger()

    def _call_fd(self, index: int) -> int:
        """An eventfd for a backend's used-buffer notifications of queue ``index`` (``notifier``).

        The device's irqfd itself where it has one (KVM's): the backend's signal reaches the guest with no
        wake of evmm, as Firecracker does for vhost-user devices on virtio-mmio.  Linux's handler (vm_interrupt)
        then finds nothing in the status bits we set, so InterruptStatus reports INT_VRING whenever a backend
        holds a queue: the driver looks at its used rings on every interrupt of this device, which for a config
        change costs a scan of queues with nothing new and is otherwise what it would do anyway.  Without an
        irqfd (unit tests) the reactor reads a fresh eventfd and raises the interrupt.  No EVENT_IDX check here:
        the backend applied the driver's used_event itself.
        """
        if not 0 <= index < len(self.device.queue_sizes):
            raise QueueBroken(f"queue {index} does not exist")
        fd = self._call_fds.get(index)
        if fd is None:
            irqfd = getattr(self._irq, "fd", -1)  # an IrqfdInterrupt's eventfd; fakes have none
            if isinstance(irqfd, int) and irqfd >= 0:
                fd = irqfd
                self._direct_calls += 1
            else:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._reactor.add_reader(fd, self._on_call_fd, fd)
            self._call_fds[index] = fd
        return fd

    def _on_call_fd(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        if self.status & DRIVER_OK:
            self._interrupt_driver(INT_VRING)

    def _needs_reset(self, reason: str) -> None:
        if self.status & DEVICE_NEEDS_RESET:
            return
        if self._on_error is not None:
            self._on_error(f"{self.device.name} at {self.base:#x}: {reason}; the device needs a reset")
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self._interrupt_driver(INT_CONFIG)  # §2.1.2

    # ---- reset and teardown --------------------------------------------------------------------------------

    def _release_device(self) -> None:
        """Reset the device and take back what its activation handed out (§2.4: the queues are gone)."""
        self.device.reset()
        if self._active_interrupt is not None:
            self._active_interrupt.revoke()
            self._active_interrupt = None
        self._kicks.take_back()
        irqfd = getattr(self._irq, "fd", -1)
        for fd in self._call_fds.values():
            if fd != irqfd:
                self._reactor.remove_reader(fd)
                os.close(fd)
        self._call_fds.clear()
        self._direct_calls = 0

    def close(self) -> None:
        self._release_device()
        self.device.close()
        self._reset_state()
        for i, fd in enumerate(self._kicks.close()):
            if self._notify is not None:
                self._notify.remove(self.base + QUEUE_NOTIFY, i, fd)
