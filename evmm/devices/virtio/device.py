"""What a virtio device is to evmm: features, a config space, queues, and a context given at activation.

Devices never see the transport (virtio-mmio or virtio-pci) nor KVM.  When the driver sets DRIVER_OK the
transport builds the queues and calls ``activate(ctx)``: the context carries guest memory, the queues, the
reactor, the two ways to interrupt the driver, and the eventfds of a queue a device hands to a backend outside
evmm (vhost).  Every fd a device owns is registered on the reactor by the device itself and handled there;
the reactor thread owns all device state.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable

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


@record
class DeviceContext:
    mem: GuestMemory
    queues: list[Virtqueue | None]  # by queue number; None where the driver did not set the queue up
    reactor: asyncio.AbstractEventLoop
    features: int  # what the driver accepted
    # Tell the driver queue ``i`` has used buffers; suppressed when the driver asked for no interrupt.
    signal_used: Callable[[int], None]
    # Tell the driver the config space changed (§2.5.2 config generation moves too).
    signal_config: Callable[[], None]
    # The device cannot go on (a broken queue): DEVICE_NEEDS_RESET plus a config interrupt (§2.1.2).
    needs_reset: Callable[[str], None]
    # For a device whose queue ``i`` is served outside evmm (the kernel's vhost): an eventfd signalled on every
    # driver notification of that queue (§2.9), which the transport then no longer passes to queue_notify.
    # The transport takes it back when the device is reset.
    take_kick: Callable[[int], int]
    # The other direction for such a queue: an eventfd the backend writes when it has used buffers and has
    # itself decided, from the driver's used_event or flags (§2.7.10), that the driver wants an interrupt.
    # The transport interrupts for every write, unsuppressed; it closes the eventfd at reset.
    call_fd: Callable[[int], int]

    def queue(self, index: int) -> Virtqueue:
        q = self.queues[index] if 0 <= index < len(self.queues) else None
        if q is None:
            raise QueueBroken(f"queue {index} was not set up by the driver")
        return q


class VirtioDevice(ABC):
    device_id: int
    name: str

    def __init__(self, queue_sizes: tuple[int, ...]) -> None:
        self.queue_sizes = queue_sizes
        self.ctx: DeviceContext | None = None

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

    def activate(self, ctx: DeviceContext) -> None:
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
