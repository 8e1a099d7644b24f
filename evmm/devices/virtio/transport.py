"""What every virtio transport does the same way, whatever its registers look like (virtio-mmio §4.2,
virtio-pci §4.1): the device status machine (§2.1, §3.1.1), feature negotiation (§2.2), the driver's queue
configuration and the queues it becomes at DRIVER_OK, kicks, DEVICE_NEEDS_RESET, reset, and the
``VirtioInterrupt`` a device is given.

A transport decodes its own register layout onto a ``TransportCore`` and supplies one thing: ``signal(source)``,
its way of interrupting the driver for a queue or a config change (virtio-mmio: an InterruptStatus bit and
an irqfd; virtio-pci: an MSI-X vector, or the ISR and INTx).  It may also supply ``direct_call(queue)``: an
eventfd that interrupts the driver for the queue with no help from evmm, which a backend outside evmm
(vhost) then signals itself (virtio-mmio: the device's irqfd).  Everything runs on the reactor.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

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

# Device status bits (§2.1).
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80


class _Interrupt:
    """The ``VirtioInterrupt`` of one activation, until the device's reset."""

    def __init__(self, core: TransportCore) -> None:
        self._core: TransportCore | None = core

    def trigger(self, source: int) -> None:
        core = self._core
        if core is not None:
            core.interrupt_driver(source)

    def notifier(self, queue: int) -> int:
        core = self._core
        if core is None:
            raise QueueBroken("the device was reset")
        return core.call_fd(queue)

    def needs_reset(self, reason: str) -> None:
        core = self._core
        if core is not None:
            core.needs_reset(reason)

    def revoke(self) -> None:
        self._core = None


class TransportCore:
    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        reactor: asyncio.AbstractEventLoop,
        signal: Callable[[int], None],
        where: str,
        kick_eventfds: Sequence[int] = (),
        on_error: Callable[[str], None] | None = None,
        direct_call: Callable[[int], int | None] | None = None,
    ) -> None:
        """``signal(source)`` interrupts the driver for queue ``source`` or ``CONFIG_CHANGE``; ``where`` names
        the device in messages ("virtio-blk at 0xd0000000"); ``kick_eventfds``: one ioeventfd per queue;
        ``direct_call(queue)``: the transport's own eventfd for the queue's interrupts, or None (``call_fd``)."""
        self.device = device
        self._mem = mem
        self._reactor = reactor
        self._signal = signal
        self.where = where
        self._on_error = on_error
        self._active_interrupt: _Interrupt | None = None
        self._call_fds: dict[int, int] = {}  # queue -> eventfd a backend writes to interrupt the driver
        self._direct_call = direct_call
        self._direct: set[int] = set()  # queues whose call fd is the transport's (not ours to read or close)
        self.kicks = Kicks(reactor, len(device.queue_sizes), self.kick, kick_eventfds)
        self.reset_state()

    def reset_state(self) -> None:
        for q in getattr(self, "active", []):
            if q is not None:
                q.release()
        self.status = 0
        self.driver_features = 0
        self.queues = [QueueConfig() for _ in self.device.queue_sizes]
        self.active: list[Virtqueue | None] = [None] * len(self.device.queue_sizes)
        self.config_generation = 0

    @property
    def queue_count(self) -> int:
        return len(self.device.queue_sizes)

    # ---- features (§2.2): 32 bits at a time, the word the driver selected ----------------------------------

    def device_features(self, select: int) -> int:
        return (self.device.features() >> (32 * select)) & 0xFFFFFFFF if 0 <= select < 2 else 0

    def write_driver_features(self, select: int, value: int) -> None:
        if self.status & FEATURES_OK or not 0 <= select < 2:
            return  # fixed once FEATURES_OK is set (§3.1.1 step 5)
        shift = 32 * select
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (
            (value & 0xFFFFFFFF) << shift
        )

    def queue_config(self, index: int) -> QueueConfig | None:
        """The driver's view of queue ``index``, writable until DRIVER_OK; None for no such queue."""
        if not 0 <= index < self.queue_count or self.status & DRIVER_OK:
            return None
        return self.queues[index]

    def read_config(self, offset: int, size: int) -> int:
        cfg = self.device.config()
        chunk = cfg[offset : offset + size]
        return int.from_bytes(chunk.ljust(size, b"\0"), "little") if 0 <= offset < len(cfg) else 0

    # ---- status machine (§3.1.1) -------------------------------------------------------------------------

    def write_status(self, value: int) -> None:
        log.debug("%s: status %#x -> %#x", self.where, self.status, value)
        if value == 0:
            self.release_device()
            self.reset_state()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.features()
            if self.driver_features & ~offered or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~FEATURES_OK  # the driver reads status back and gives up (§3.1.1 step 6)
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            if not value & FEATURES_OK:
                return
            self.status = value
            self.activate()
            return
        self.status = value

    def activate(self, prepare: Callable[[Virtqueue], None] | None = None) -> None:
        """Build the queues and start the device, as DRIVER_OK does; ``prepare`` sets each queue's ring indices
        first (a restored snapshot)."""
        event_idx = bool(self.driver_features & VIRTIO_F_EVENT_IDX)
        for i, cfg in enumerate(self.queues):
            if not cfg.ready:
                continue
            why = check_queue_config(cfg, self.device.queue_sizes[i], self._mem)
            if why is not None:
                self.needs_reset(f"queue {i}: {why}")
                return
            queue = Virtqueue(i, cfg, self._mem, event_idx=event_idx)
            if prepare is not None:
                prepare(queue)
            self.active[i] = queue
        log.debug(
            "%s: activated, features %#x, queues %s",
            self.where,
            self.driver_features,
            [(q.index, q.size) for q in self.active if q is not None],
        )
        self._active_interrupt = _Interrupt(self)
        ctx = Activation(
            mem=self._mem,
            queues=tuple(self.active),
            interrupt=self._active_interrupt,
            kicks=self.kicks,
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
        if self.kicks.notified(index):
            return  # the queue is a backend's: it got the notification
        if 0 <= index < len(self.active) and self.active[index] is not None:
            try:
                self.device.queue_notify(index)
            except QueueBroken as e:
                self.needs_reset(str(e))

    # ---- interrupts: what the device's VirtioInterrupt does -------------------------------------------------

    def interrupt_driver(self, source: int) -> None:
        if source == CONFIG_CHANGE:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF  # §2.5.1
        self._signal(source)

    @property
    def direct_calls(self) -> bool:
        """Whether a backend holds a queue whose interrupts go straight to the driver (``direct_call``)."""
        return bool(self._direct)

    def call_fd(self, index: int) -> int:
        """An eventfd for a backend's used-buffer notifications of queue ``index`` (``notifier``).

        The transport's ``direct_call`` fd where it has one (virtio-mmio: KVM's irqfd of the device): the
        backend's signal reaches the guest with no wake of evmm, as Firecracker does for vhost-user devices
        on virtio-mmio.  Otherwise the reactor reads a fresh eventfd and interrupts the driver for the queue,
        one wake per interrupt, because the transport's interrupt needs state only the reactor has (an MSI-X
        vector's mask and pending bit).  Either way unsuppressed: the backend applied the driver's used_event
        itself, and the Virtqueue's record of what was signalled knows nothing of its entries."""
        if not 0 <= index < self.queue_count:
            raise QueueBroken(f"queue {index} does not exist")
        fd = self._call_fds.get(index)
        if fd is None:
            fd = self._direct_call(index) if self._direct_call is not None else None
            if fd is not None:
                self._direct.add(index)
            else:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._reactor.add_reader(fd, self._on_call_fd, index, fd)
            self._call_fds[index] = fd
        return fd

    def _on_call_fd(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        if self.status & DRIVER_OK:
            self.interrupt_driver(index)

    def needs_reset(self, reason: str) -> None:
        if self.status & DEVICE_NEEDS_RESET:
            return
        if self._on_error is not None:
            self._on_error(f"{self.where}: {reason}; the device needs a reset")
        self.status |= DEVICE_NEEDS_RESET
        if self.status & DRIVER_OK:
            self.interrupt_driver(CONFIG_CHANGE)  # §2.1.2

    # ---- reset and teardown --------------------------------------------------------------------------------

    def release_device(self) -> None:
        """Reset the device and take back what its activation handed out (§2.4: the queues are gone)."""
        self.device.reset()
        if self._active_interrupt is not None:
            self._active_interrupt.revoke()
            self._active_interrupt = None
        self.kicks.take_back()
        for index, fd in self._call_fds.items():
            if index not in self._direct:
                self._reactor.remove_reader(fd)
                os.close(fd)
        self._call_fds.clear()
        self._direct.clear()

    def close(self) -> list[int]:
        """The VM is going away: the device released and closed; returns the kick ioeventfds to unregister."""
        self.release_device()
        self.device.close()
        self.reset_state()
        return self.kicks.close()

    def describe(self) -> dict[str, object]:
        return {
            "device": self.device.name,
            "status": self.status,
            "driver_features": self.driver_features,
            "queues": [None if q is None else q.status() for q in self.active],
            **self.device.debug_state(),
        }
