"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2): a register file in front of a ``VirtioDevice``.

Runs on the reactor: register accesses arrive through the vCPU exit channel, queue kicks through ioeventfds
(one per queue, KVM matching the queue index written to QueueNotify, so a kick never exits to userspace), and
interrupts leave through an irqfd.  Two registers are served on the vCPU thread instead (``on_vcpu``):
InterruptStatus and InterruptAck, which Linux's interrupt handler (vm_interrupt) reads and writes on every
interrupt; they touch nothing but the interrupt status, under its own lock.  What every transport does alike
(status, features, queues, activation, kicks, the device's interrupt object) is the ``TransportCore``'s.
A device may hand a queue to a backend outside evmm (vhost): the queue's ioeventfd becomes the backend's
kick, and the backend signals the driver through the device's irqfd itself (``_direct_call``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

from evmm.devices.bus import OnVcpu
from evmm.devices.irq import Interrupt
from evmm.devices.virtio.device import CONFIG_CHANGE, VirtioDevice
from evmm.devices.virtio.queue import QueueConfig
from evmm.devices.virtio.transport import ACKNOWLEDGE as ACKNOWLEDGE  # the status bits, re-exported
from evmm.devices.virtio.transport import DEVICE_NEEDS_RESET as DEVICE_NEEDS_RESET
from evmm.devices.virtio.transport import DRIVER as DRIVER
from evmm.devices.virtio.transport import DRIVER_OK as DRIVER_OK
from evmm.devices.virtio.transport import FAILED as FAILED
from evmm.devices.virtio.transport import FEATURES_OK as FEATURES_OK
from evmm.devices.virtio.transport import TransportCore
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

# InterruptStatus bits (§4.2.2).
INT_VRING = 1
INT_CONFIG = 2


class NotifyRegistrar(Protocol):
    """Registers an eventfd that KVM signals when the guest writes ``datamatch`` (4 bytes) at ``addr``."""

    def add(self, addr: int, datamatch: int) -> int: ...

    def remove(self, addr: int, datamatch: int, fd: int) -> None: ...


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
        self.base = base
        self._irq = interrupt
        self._notify = notify
        self._on_error = on_error
        # InterruptStatus is read and acknowledged on vCPU threads (on_vcpu) while the reactor sets bits: every
        # read-modify-write of it holds this lock, so no bit set by one is lost to the other.  (CPython 3.11
        # happens not to switch threads inside ``x |= y``; the language does not promise it.)
        self._isr_lock = threading.Lock()
        self.interrupt_status = 0
        count = len(device.queue_sizes)
        eventfds = [notify.add(base + QUEUE_NOTIFY, i) for i in range(count)] if notify is not None else []
        self.core = TransportCore(
            device,
            mem,
            reactor,
            self._signal,
            f"{device.name} at {base:#x}",
            eventfds,
            self._error,
            direct_call=self._direct_call,
        )
        self._reset_state()

    @property
    def device(self) -> VirtioDevice:
        return self.core.device

    @property
    def queues(self) -> list[QueueConfig]:
        return self.core.queues

    def _error(self, message: str) -> None:
        if self._on_error is not None:
            self._on_error(message)

    def _reset_state(self) -> None:
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        with self._isr_lock:
            self.interrupt_status = 0

    def describe(self) -> dict[str, object]:
        """Transport and queue state for query-vm (on the reactor, which owns all of it)."""
        return {"virtio": {**self.core.describe(), "interrupt_status": self.interrupt_status}}

    # ---- interrupt status: read and acknowledged on vCPU threads, set on the reactor ----------------------

    def _signal(self, source: int) -> None:
        """The device's interrupt (``TransportCore``): an InterruptStatus bit, then the irqfd."""
        with self._isr_lock:
            self.interrupt_status |= INT_CONFIG if source == CONFIG_CHANGE else INT_VRING
        self._irq.trigger()

    def _direct_call(self, queue: int) -> int | None:
        """The device's irqfd, for a backend to interrupt the driver with (``TransportCore.call_fd``).

        Linux's handler (vm_interrupt) then finds no bit set for the backend's signal, so InterruptStatus
        reports INT_VRING whenever a backend holds a queue: the driver looks at its used rings on every
        interrupt of this device, which for a config change costs a scan of queues with nothing new and is
        otherwise what it would do anyway.  None without an irqfd (the tests' fakes): the reactor path."""
        fd = getattr(self._irq, "fd", None)  # IrqfdInterrupt's eventfd, which KVM turns into the GSI
        return fd if isinstance(fd, int) and fd >= 0 else None

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
            return self.interrupt_status | (INT_VRING if self.core.direct_calls else 0)
        core = self.core
        if offset >= CONFIG:
            return core.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            return 0  # §4.2.2.2: the driver MUST use 32-bit accesses for registers
        q = core.queues[self.queue_sel] if self.queue_sel < core.queue_count else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return core.device_features(self.device_features_sel)
        if offset == QUEUE_NUM_MAX:
            return self.device.queue_sizes[self.queue_sel] if q is not None else 0
        if offset == QUEUE_READY:
            return int(q.ready) if q is not None else 0
        if offset == STATUS:
            return core.status
        if offset == CONFIG_GENERATION:
            return core.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions (§4.2.2: length -1 means none)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == INTERRUPT_ACK:
            if size == 4:  # on the vCPU thread (on_vcpu), under the status lock
                self._clear_interrupt(value)
            return
        core = self.core
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, value.to_bytes(size, "little"))
            return
        if size != 4 or offset % 4:
            return
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            core.write_driver_features(self.driver_features_sel, value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            core.kick(value)
        elif offset == STATUS:
            core.write_status(value)
            if value == 0:
                self._reset_state()
        else:
            q = core.queue_config(self.queue_sel)
            if q is not None:
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

    def kick(self, index: int) -> None:
        self.core.kick(index)

    def close(self) -> None:
        for i, fd in enumerate(self.core.close()):
            if self._notify is not None:
                self._notify.remove(self.base + QUEUE_NOTIFY, i, fd)
        self._reset_state()
