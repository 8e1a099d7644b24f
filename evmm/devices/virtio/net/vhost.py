"""virtio-net served by the kernel's vhost-net: evmm keeps the config space, the features and the control queue.

Each queue pair (receiveqN at 2N-2, transmitqN at 2N-1, virtio 1.2 §5.1.2) is the two rings of one open
/dev/vhost-net, whose kernel worker moves frames between them and one queue of the tap (drivers/vhost/net.c):
no frame passes through Python.  The tap keeps its 12-byte virtio-net header (the kernel's ``sock_hlen``, as
VERSION_1 and MRG_RXBUF make it 12), so vhost passes headers between rings and tap unchanged, and evmm still
sets the tap's offloads from what the driver accepted (TUNSETOFFLOAD), as for its own data path.

With more than one pair the device offers VIRTIO_NET_F_MQ and the control queue (last), which evmm serves:
the driver starts on one pair (§5.1.6.5.5) and asks for more with VQ_PAIRS_SET; a pair beyond that has its
rings set up but no tap queue behind them, and its tap queue is out of the kernel's spread of flows.

The ioctls, in order:
  make (before boot):   per pair: open, SET_OWNER, GET_FEATURES
  DRIVER_OK (activate): per pair: SET_FEATURES (the ring features the driver accepted), SET_MEM_TABLE, then
                        for RX and TX the ring set-up of evmm.devices.virtio.vhost.hand_over; then
                        NET_SET_BACKEND (the tap queue) for each ring of the pairs in use
  VQ_PAIRS_SET n:       attach pairs below n (tap queue first, then NET_SET_BACKEND), detach the others
  take_rings:           NET_SET_BACKEND -1 on every ring, then GET_VRING_BASE and unbind (``take_back``);
                        ``give_rings`` sets the bases again and reattaches (for snapshots and restores)
  reset (status 0):     ``take_rings``, and the transport takes its eventfds back
  VM exit (close):      close every vhost fd, then the tap
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from evmm.devices.virtio.device import (
    CONFIG_CHANGE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    Activation,
    VirtioDevice,
)
from evmm.devices.virtio.net import ctrl
from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.device import NoTap, clear_offloads, net_config, net_features, valid_mtu
from evmm.devices.virtio.net.tap import tap_offloads
from evmm.devices.virtio.queue import QueueBroken
from evmm.devices.virtio.vhost import VhostBackend, hand_over, take_back
from evmm.log import log

VIRTIO_NET_F_MQ = 1 << 22  # §5.1.3
QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
RX_RING, TX_RING = 0, 1  # the rings of one /dev/vhost-net
# What the kernel must do for the driver's features to hold: the ring layout features and merged receive
# buffers, which vhost-net fills itself.  The rest (offloads, MAC, status, MTU, MQ) is evmm's device model.
VHOST_RING_FEATURES = (
    VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | h.VIRTIO_NET_F_MRG_RXBUF
)


class VhostNetBackend(VhostBackend, Protocol):
    """One open /dev/vhost-net (evmm.vhost.net.VhostNetFd; tests pass a recording fake)."""

    def set_backend(self, index: int, fd: int | None) -> None: ...


class MultiQueueTap(Protocol):
    """A tap with one fd per queue (evmm.devices.virtio.net.tap.Tap; an empty slot's ``NoTap`` has none)."""

    @property
    def fd(self) -> int: ...

    @property
    def queues(self) -> list[int]: ...

    def set_offload(self, flags: int) -> None: ...

    def set_queue_attached(self, index: int, attached: bool) -> None: ...

    def close(self) -> None: ...


class NoQueues(NoTap):
    """An empty hot-replace slot: no tap queues, link down."""

    def __init__(self) -> None:
        self.queues: list[int] = []

    def set_queue_attached(self, index: int, attached: bool) -> None:
        pass


class VhostNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "vhost-net"

    def __init__(
        self,
        tap: MultiQueueTap,
        mac: bytes,
        backends: Sequence[VhostNetBackend],
        *,
        mtu: int | None = None,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        pairs = len(backends)
        if not pairs:
            raise ValueError("a vhost-net NIC needs a /dev/vhost-net per queue pair")
        if tap.fd >= 0 and len(tap.queues) != pairs:
            raise ValueError(f"{pairs} queue pairs need a tap with {pairs} queues, not {len(tap.queues)}")
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        super().__init__((queue_size,) * (2 * pairs) + ((CTRL_QUEUE_SIZE,) if pairs > 1 else ()))
        self.tap = tap
        self.mac = mac
        self.mtu = valid_mtu(mtu)
        self.backends = list(backends)
        self.pairs = pairs
        kernel = -1
        for b in self.backends:
            kernel &= b.get_features()
        offered = net_features(mtu=self.mtu) & ~(VHOST_RING_FEATURES & ~kernel)
        if pairs > 1:
            offered |= VIRTIO_NET_F_MQ | h.VIRTIO_NET_F_CTRL_VQ
        self._offered = offered
        self._kernel_features = kernel
        self._rings_set = 0  # pairs whose rings the kernel holds (the first ones), this activation
        self._active = 0  # pairs whose rings have the tap behind them
        self._spread = [True] * len(tap.queues)  # tap queues the kernel spreads flows over (attached)
        self._wanted = 0  # pairs the driver asked for (VQ_PAIRS_SET; 1 until then, §5.1.6.5.5)
        self.vring_bases: dict[int, int] = {}  # queue index -> where the kernel stopped, at the last take

    @classmethod
    def empty(cls, mac: bytes, backend: VhostNetBackend) -> VhostNet:
        """A one-pair NIC with no tap (a hot-replace slot): link down until ``replace_tap`` gives it one."""
        return cls(NoQueues(), mac, [backend])

    @property
    def link_up(self) -> bool:
        return self.tap.fd >= 0

    @property
    def ctrl_queue(self) -> int | None:
        return 2 * self.pairs if self.pairs > 1 else None

    # ---- what the transport asks ---------------------------------------------------------------------

    def features(self) -> int:
        return self._offered

    def config(self) -> bytes:
        return net_config(self.mac, self.link_up, self.mtu, self.pairs)

    def activate(self, ctx: Activation) -> None:
        super().activate(ctx)
        self._wanted = 1
        try:
            self._start(ctx)
        except (OSError, QueueBroken) as e:
            # The guest then sees DEVICE_NEEDS_RESET; the VMM and the other devices go on.
            self.take_rings()
            ctx.interrupt.needs_reset(_why(e))

    def _start(self, ctx: Activation) -> None:
        self.tap.set_offload(tap_offloads(ctx.features))
        features = ctx.features & VHOST_RING_FEATURES
        for p, b in enumerate(self.backends):
            rx, tx = ctx.queues[2 * p], ctx.queues[2 * p + 1]
            if rx is None or tx is None:
                if p == 0:
                    raise QueueBroken("the driver set up no first queue pair")
                break  # a driver that uses fewer pairs: those after stay unused
            b.set_features(features)
            b.set_mem_table(ctx.mem.regions)
            self._rings_set = p + 1
            hand_over(b, RX_RING, rx, ctx)
            hand_over(b, TX_RING, tx, ctx)
        self._attach(self._wanted)

    def _attach(self, pairs: int) -> None:
        """Put the tap behind the first ``pairs`` pairs (as far as rings are set) and none behind the rest.

        A tap queue is in the kernel's spread of flows only while its pair is in use (the first always: a tap
        with no queue attached loses its carrier), or frames would wait there for a reader that never comes.
        Attached before vhost is given it and detached after vhost let go: vhost cannot use a detached queue.
        """
        pairs = min(pairs, self._rings_set) if self.link_up else 0
        for p in reversed(range(pairs, self._active)):
            self.backends[p].set_backend(RX_RING, None)
            self.backends[p].set_backend(TX_RING, None)
            self._active = p
        for q, on in enumerate(self._spread):
            if on != (q < max(pairs, 1)):
                self.tap.set_queue_attached(q, not on)
                self._spread[q] = not on
        for p in range(self._active, pairs):
            fd = self.tap.queues[p]
            self.backends[p].set_backend(RX_RING, fd)
            self.backends[p].set_backend(TX_RING, fd)
            self._active = p + 1

    def queue_notify(self, index: int) -> None:
        # Every queue but the control queue is the kernel's: its kicks never reach here.
        ctx = self.ctx
        if ctx is not None and index == self.ctrl_queue:
            ctrl.serve(ctx, ctx.queue(index), self._command)

    def _command(self, cmd: ctrl.CtrlCommand) -> int:
        pairs = ctrl.vq_pairs(cmd, self.pairs)
        if pairs is None:
            log.debug("%s: control command class %d command %d refused", self.name, cmd.cls, cmd.command)
            return ctrl.VIRTIO_NET_ERR
        try:
            self._attach(pairs)
        except OSError as e:
            log.warning("%s: using %d queue pairs failed: %s", self.name, pairs, _why(e))
            return ctrl.VIRTIO_NET_ERR
        self._wanted = pairs
        return ctrl.VIRTIO_NET_OK

    # ---- taking the rings back from the kernel, and handing them over again ------------------------------

    def take_rings(self) -> dict[int, int]:
        """Stop the kernel's data path and take every ring back; never raises (reset and close must finish).

        Afterwards nothing but the driver touches the rings, and ``vring_bases`` holds, per queue index,
        the next avail index the kernel would have read: what a snapshot saves with the rings themselves.
        """
        try:
            self._attach(0)
        except OSError as e:
            log.warning("%s: detaching the tap: %s", self.name, _why(e))
        for p in range(self._rings_set):
            for ring in (RX_RING, TX_RING):
                try:
                    self.vring_bases[2 * p + ring] = take_back(self.backends[p], ring)
                except OSError as e:
                    log.warning("%s: stopping the kernel's queue %d: %s", self.name, 2 * p + ring, _why(e))
        self._rings_set = 0
        return dict(self.vring_bases)

    def give_rings(self, ctx: Activation) -> None:
        """Hand the rings back to the kernel where ``take_rings`` left them (the queues' ``next_avail`` are
        set from ``vring_bases`` first), with the pairs the driver asked for."""
        for index, base in self.vring_bases.items():
            q = ctx.queues[index] if index < len(ctx.queues) else None
            if q is not None:
                q.next_avail = base
        try:
            self._start(ctx)
        except (OSError, QueueBroken) as e:
            self.take_rings()
            ctx.interrupt.needs_reset(_why(e))

    # ---- hot-replace ---------------------------------------------------------------------------------

    def replace_tap(self, tap: MultiQueueTap | None) -> None:
        """Swap the tap while the guest runs (None empties the slot); on the reactor.

        The kernel lets go of the old tap's queues before it is closed and takes the new one's; the link
        status follows with a configuration change interrupt (§5.1.4, §2.5.2), as ``VirtioNet.replace_tap``.
        """
        new: MultiQueueTap = tap if tap is not None else NoQueues()
        if new.fd >= 0 and len(new.queues) != self.pairs:
            raise ValueError(f"{self.pairs} queue pairs need a tap with {self.pairs} queues")
        ctx = self.ctx
        wanted = self._wanted
        try:
            self._attach(0)
        except OSError as e:
            log.warning("%s: detaching the old tap: %s", self.name, _why(e))
        old, self.tap = self.tap, new
        self._spread = [True] * len(new.queues)
        old.close()
        if ctx is None:
            return
        try:
            self.tap.set_offload(tap_offloads(ctx.features))
            self._attach(wanted)
        except OSError as e:
            ctx.interrupt.needs_reset(f"the new tap: {_why(e)}")
            return
        ctx.interrupt.trigger(CONFIG_CHANGE)

    # ---- reset and teardown --------------------------------------------------------------------------

    def reset(self) -> None:
        self.take_rings()
        self._wanted = 0
        clear_offloads(self.tap)
        super().reset()

    def close(self) -> None:
        self.reset()
        for b in self.backends:
            b.close()  # the kernel's references to the tap go with them
        self.tap.close()

    def debug_state(self) -> dict[str, object]:
        return {
            "vhost": True,
            "queue_pairs": self.pairs,
            "pairs_in_use": self._active,  # with the tap behind them
            "vring_bases": dict(self.vring_bases),
        }


def _why(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


__all__ = ["VHOST_RING_FEATURES", "VIRTIO_NET_F_MQ", "NoQueues", "VhostNet", "VhostNetBackend"]
