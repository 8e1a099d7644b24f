"""What a virtio device is to evmm: features, a config space, queues, and what it is given at activation.

This is the whole interface between a device and the transport in front of it (virtio-mmio today, virtio-pci
next); a device never sees which one it has, nor KVM.

    class MyDevice(VirtioDevice):
        device_id = VIRTIO_ID_...            # virtio 1.2 §5
        name = "my-device"

        def __init__(self) -> None:
            super().__init__((256, 256))      # the maximum size of each queue, in queue order

        def features(self) -> int:            # device feature bits, COMMON_FEATURES included
        def config(self) -> bytes:            # the device-specific config space (§4.2.2 offset 0x100)
        def write_config(self, offset, data)  # only if some of it is writable
        def activate(self, ctx: Activation)   # DRIVER_OK: call super(), then start (register fds...)
        def queue_notify(self, index: int)    # the driver kicked queue ``index``
        def reset(self)                       # stop everything activate started, then super().reset()
        def close(self)                       # the VM is going away: release host resources

On a kick the device pops chains from the queue (``ctx.queue(i).pop(ctx.mem)``), completes them
(``add_used``) and then calls ``ctx.signal_used(q)``: the queue decides from the driver's used_event or
flags (§2.7.10) whether the driver wants an interrupt, and ``ctx.interrupt.trigger(q.index)`` sends it, as
Firecracker's ``Queue::prepare_kick`` and ``VirtioInterrupt::trigger`` do.  A config change is
``ctx.interrupt.trigger(CONFIG_CHANGE)``; a device that cannot go on (a ring the driver broke) calls
``ctx.interrupt.needs_reset(reason)``, and a ``QueueBroken`` raised out of ``queue_notify`` does the same.

Everything runs on the reactor, which owns all device state: a device registers each fd it owns there itself
and handles it there.  ``ctx`` is the device's until ``reset``; a trigger through a stale one does nothing.

A queue served outside evmm (the kernel's vhost) takes its notifications with ``ctx.kicks.take(i)`` (an eventfd
signalled on each driver notification, §2.9) and interrupts the driver through ``ctx.interrupt.notifier(i)``
(an eventfd whose every write is an interrupt for queue ``i``, unsuppressed: the backend read used_event
itself).  The transport takes both back at reset.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Protocol

from evmm.devices.virtio.queue import QueueBroken, Virtqueue
from evmm.memory import GuestMemory
from evmm.record import record

# Device IDs (virtio 1.2 §5).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19

# Reserved feature bits (§6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX

CONFIG_CHANGE = -1  # the source of a configuration change interrupt (§2.5.2); queues are 0, 1, ...


class VirtioInterrupt(Protocol):
    """The device's one line to the driver; the transport turns it into its own signal (virtio-mmio: an
    InterruptStatus bit and an irqfd; virtio-pci: the queue's or the config MSI-X vector)."""

    def trigger(self, source: int) -> None:
        """Interrupt the driver for queue ``source``, or for a config change when it is ``CONFIG_CHANGE``."""

    def notifier(self, queue: int) -> int:
        """An eventfd for a backend outside evmm: each write is an interrupt for ``queue``, unsuppressed."""

    def needs_reset(self, reason: str) -> None:
        """The device cannot go on: DEVICE_NEEDS_RESET and a config change interrupt (§2.1.2)."""


class QueueKicks(Protocol):
    """The driver's notifications of each queue, for a device that hands a queue to a backend outside evmm."""

    def take(self, index: int) -> int:
        """An eventfd signalled on every notification of queue ``index``, which no longer reaches
        ``queue_notify``, until the device is reset."""


@record(frozen=True)
class Activation:
    """What a device is given when the driver sets DRIVER_OK, valid until the device is reset."""

    mem: GuestMemory
    queues: tuple[Virtqueue | None, ...]  # by queue number; None where the driver did not set the queue up
    interrupt: VirtioInterrupt
    kicks: QueueKicks
    reactor: asyncio.AbstractEventLoop
    features: int  # what the driver accepted

    def queue(self, index: int) -> Virtqueue:
        q = self.queues[index] if 0 <= index < len(self.queues) else None
        if q is None:
            raise QueueBroken(f"queue {index} was not set up by the driver")
        return q

    def signal_used(self, q: Virtqueue) -> None:
        """After completing chains on ``q``: interrupt the driver if it asked to be (§2.7.10)."""
        if q.needs_interrupt():
            self.interrupt.trigger(q.index)


class VirtioDevice(ABC):
    device_id: int
    name: str

    def __init__(self, queue_sizes: tuple[int, ...]) -> None:
        self.queue_sizes = queue_sizes
        self.ctx: Activation | None = None

    @property
    def activated(self) -> bool:
        return self.ctx is not None

    @abstractmethod
    def features(self) -> int:
        """Device feature bits, including the COMMON_FEATURES it supports."""

    @abstractmethod
    def config(self) -> bytes:
        """The device-specific configuration space (§4.2.2 offset 0x100 onwards)."""

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - most configs are read-only
        """The driver wrote the config space; read-only unless the device says otherwise."""

    def activate(self, ctx: Activation) -> None:
        self.ctx = ctx

    @abstractmethod
    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index`` (from an ioeventfd, on the reactor)."""

    def reset(self) -> None:
        """The driver reset the device (status 0): drop queues and stop every activity started by activate."""
        self.ctx = None

    def debug_state(self) -> dict[str, object]:
        """Device-specific live state for query-vm (backpressure, frames in flight); empty by default."""
        return {}

    def close(self) -> None:  # noqa: B027 - devices with host resources override it
        """The VM is going away: release host resources (files, sockets, taps)."""
