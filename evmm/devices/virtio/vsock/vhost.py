"""virtio-vsock served by the kernel's vhost-vsock: evmm keeps the config space and the EVENT queue.

The kernel (drivers/vhost/vsock.c) moves every packet of the RX (0) and TX (1) queues between the guest's
rings and AF_VSOCK sockets on this host, where the guest is reached at its CID and sees the host as CID 2.
evmm only tells it where guest RAM is, where the rings are and which eventfds carry kicks and interrupts
(linux/vhost.h).  The EVENT queue (2) is not the kernel's: evmm serves it, for TRANSPORT_RESET (§5.10.6.7).

The ioctls, in order:
  make_vsock (before boot):  open, SET_OWNER, GET_FEATURES, VSOCK_SET_GUEST_CID
  DRIVER_OK (activate):      SET_FEATURES (exactly what the driver accepted), SET_MEM_TABLE, then for RX
                             and TX: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_KICK,
                             SET_VRING_CALL; last VSOCK_SET_RUNNING 1
  reset (status 0):          VSOCK_SET_RUNNING 0, then for RX and TX: GET_VRING_BASE, SET_VRING_KICK and
                             SET_VRING_CALL to -1 (the transport takes both eventfds back)
  VM exit (close):           close, which frees the CID and resets the guest's connections
"""

from __future__ import annotations

import struct
from typing import Protocol

from evmm.devices.virtio.device import COMMON_FEATURES, VIRTIO_ID_VSOCK, Activation, VirtioDevice
from evmm.devices.virtio.queue import QueueBroken
from evmm.devices.virtio.vhost import VhostBackend, hand_over, take_back
from evmm.devices.virtio.vsock.device import (
    EVENT_QUEUE,
    QUEUE_SIZE,
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_VSOCK_F_STREAM,
)
from evmm.devices.virtio.vsock.event import EventQueue
from evmm.log import log

VIRTIO_VSOCK_F_SEQPACKET = 1 << 1  # §5.10.3
# What evmm may pass on from vhost's features: the ring features its transport and Virtqueue implement, and
# the vsock ones (the kernel does the packets, so what it supports the guest gets).  Never ACCESS_PLATFORM
# (bit 33: needs vhost's IOTLB), LOG_ALL (bit 26: dirty logging for migration), or the legacy ANY_LAYOUT and
# NOTIFY_ON_EMPTY bits, which a VERSION_1 transport does not offer.
VHOST_OFFERABLE = COMMON_FEATURES | VIRTIO_VSOCK_F_STREAM | VIRTIO_VSOCK_F_SEQPACKET
VHOST_QUEUES = (RX_QUEUE, TX_QUEUE)


class VhostVsockBackend(VhostBackend, Protocol):
    """An open /dev/vhost-vsock (evmm.vhost.vsock.VhostVsockFd; tests pass a recording fake)."""

    def set_guest_cid(self, cid: int) -> None: ...
    def set_running(self, running: bool) -> None: ...


class VhostVsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    name = "vhost-vsock"

    def __init__(self, guest_cid: int, backend: VhostVsockBackend) -> None:
        super().__init__((QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE))
        self.guest_cid = guest_cid
        self.backend = backend
        self._features = backend.get_features() & VHOST_OFFERABLE
        self._events = EventQueue(EVENT_QUEUE)
        self._rings_set = False  # the kernel holds ring addresses and eventfds of the current activation
        self._running = False
        self.vring_bases: dict[int, int] = {}  # where each kernel ring stopped, at the last reset

    def features(self) -> int:
        return self._features

    def debug_state(self) -> dict[str, object]:
        # Host programs reach the guest over AF_VSOCK at this CID (how `evmm exec` finds its agent).
        return {"vsock": {"cid": self.guest_cid, "vhost": True}}

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)  # struct virtio_vsock_config { le64 guest_cid; }

    def activate(self, ctx: Activation) -> None:
        super().activate(ctx)
        try:
            self._start(ctx)
        except (OSError, QueueBroken) as e:
            # The guest then sees DEVICE_NEEDS_RESET; the VMM and the other devices go on.
            self._stop()
            ctx.interrupt.needs_reset((e.strerror if isinstance(e, OSError) else None) or str(e))

    def _start(self, ctx: Activation) -> None:
        b = self.backend
        b.set_features(ctx.features)  # the transport checked they are a subset of what we offered
        b.set_mem_table(ctx.mem.regions)
        self._rings_set = True
        for i in VHOST_QUEUES:
            hand_over(b, i, ctx.queue(i), ctx)  # the queues are the kernel's rings 0 and 1
        b.set_running(True)
        self._running = True

    def _stop(self) -> None:
        """Stop the kernel's rings and unbind our eventfds; never raises (reset and close must finish)."""
        b = self.backend
        try:
            if self._running:
                self._running = False
                b.set_running(False)
            if self._rings_set:
                self._rings_set = False
                for i in VHOST_QUEUES:
                    self.vring_bases[i] = take_back(b, i)
        except OSError as e:
            log.warning("vhost-vsock: stopping the kernel's rings: %s", e.strerror or e)

    def queue_notify(self, index: int) -> None:
        # RX and TX kicks go to the kernel; only the EVENT queue is ours.
        if self.ctx is not None and index == EVENT_QUEUE:
            self._events.flush(self.ctx)

    def transport_reset(self) -> None:
        """Tell the driver its connections are gone (§5.10.6.7), e.g. after the host side was restored."""
        if self.ctx is not None:
            self._events.transport_reset(self.ctx)

    def reset(self) -> None:
        self._stop()
        self._events.clear()
        super().reset()

    def close(self) -> None:
        self.reset()
        self.backend.close()


__all__ = ["VHOST_OFFERABLE", "VIRTIO_VSOCK_F_SEQPACKET", "VhostVsock", "VhostVsockBackend"]
