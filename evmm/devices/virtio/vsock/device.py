"""virtio-vsock (virtio 1.2 §5.10): the queues, config space and events; the muxer does the connections.

Queues (§5.10.2): RX (0) carries packets to the guest in buffers it posts, TX (1) carries the guest's packets,
EVENT (2) holds buffers for ``virtio_vsock_event``s.  The config space is the guest's CID (§5.10.4).

Every TX packet is completed with used length 0 whether it was taken or not, so one hostile packet never
stalls the queue; an RX buffer too small for a header is completed empty.
"""

from __future__ import annotations

import logging
import struct

from evmm.devices.virtio.chain import DescriptorChain, InvalidChain
from evmm.devices.virtio.device import COMMON_FEATURES, VIRTIO_ID_VSOCK, DeviceContext, VirtioDevice
from evmm.devices.virtio.queue import Virtqueue
from evmm.devices.virtio.vsock.event import EventQueue
from evmm.devices.virtio.vsock.muxer import VsockMuxer
from evmm.devices.virtio.vsock.packet import HDR_SIZE, parse_header
from evmm.memory import GuestMemory

log = logging.getLogger("evmm")

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
VIRTIO_VSOCK_F_STREAM = 1 << 0  # §5.10.3
MAX_TX_BATCH = 256  # TX packets per kick before the reactor serves others


def gather(views: list[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of a buffer list (fewer if it is shorter)."""
    out = bytearray()
    for v in views:
        if len(out) >= n:
            break
        out += v[: n - len(out)]
    return bytes(out)


def skip_views(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers after the first ``n`` bytes."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


class VirtioVsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"

    def __init__(self, muxer: VsockMuxer) -> None:
        super().__init__((QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE))
        self.muxer = muxer
        self.guest_cid = muxer.guest_cid
        self._filling = False
        self._tx_stalled = False  # TX stopped while too many answers waited for RX buffers
        self._events = EventQueue(EVENT_QUEUE)
        self.rx_packets = 0
        self.tx_packets = 0

    def features(self) -> int:
        return COMMON_FEATURES | VIRTIO_VSOCK_F_STREAM

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)  # struct virtio_vsock_config { le64 guest_cid; }

    def activate(self, ctx: DeviceContext) -> None:
        super().activate(ctx)
        self.muxer.start(ctx.reactor, self._wake_rx)

    def queue_notify(self, index: int) -> None:
        if self.ctx is None:
            return
        if index == TX_QUEUE:
            self._process_tx()
        elif index == RX_QUEUE:
            self._fill_rx()
        elif index == EVENT_QUEUE:
            self._events.flush(self.ctx)

    # ---- TX: the guest's packets -------------------------------------------------------------------------------

    def _process_tx(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        q = ctx.queue(TX_QUEUE)
        done = 0
        while True:
            if self.muxer.tx_blocked():
                self._tx_stalled = True
                break
            chain = q.pop(ctx.mem)
            if chain is None:
                q.set_notification(True)
                if not q.has_available():
                    break
                continue
            if isinstance(chain, DescriptorChain):
                self._take_packet(ctx.mem, chain)
            else:
                self.muxer.dropped += 1
                log.debug("vsock: TX chain refused: %s", chain.reason)
            q.add_used(chain.head, 0)
            done += 1
            if done >= MAX_TX_BATCH:
                ctx.reactor.call_soon(self._process_tx)  # more later, after other ready handlers
                break
        if done:
            ctx.signal_used(TX_QUEUE)
            self._fill_rx()  # answers (RESPONSE, RST, credit) may be waiting

    def _take_packet(self, mem: GuestMemory, chain: DescriptorChain) -> None:
        self.tx_packets += 1
        views = chain.readable_views(mem)
        hdr = parse_header(gather(views, HDR_SIZE))
        if hdr is None:
            self.muxer.dropped += 1
            log.debug("vsock: TX packet of %d bytes is shorter than a header", chain.readable_len)
            return
        why = self.muxer.on_guest_packet(hdr, skip_views(views, HDR_SIZE))
        if why is not None:
            log.debug("vsock: TX packet refused: %s", why)

    # ---- RX: packets to the guest -----------------------------------------------------------------------------

    def _wake_rx(self) -> None:
        if not self._filling:
            self._fill_rx()

    def _fill_rx(self) -> None:
        ctx = self.ctx
        if ctx is None or self._filling:
            return
        q = ctx.queue(RX_QUEUE)
        self._filling = True
        used = False
        try:
            while self.muxer.has_rx():
                chain = q.pop(ctx.mem)
                if chain is None:
                    # Out of buffers: ask for a kick (§2.7.10), then look once more to close the race.
                    q.set_notification(True)
                    if q.has_available():
                        continue
                    break
                if not self._fill_one(ctx.mem, q, chain):
                    q.undo_pop()
                    break
                used = True
        finally:
            self._filling = False
        if used:
            ctx.signal_used(RX_QUEUE)
        if self._tx_stalled and not self.muxer.tx_blocked():
            self._tx_stalled = False
            ctx.reactor.call_soon(self._process_tx)

    def _fill_one(self, mem: GuestMemory, q: Virtqueue, chain: DescriptorChain | InvalidChain) -> bool:
        """Put the next packet into one RX chain; False (chain untouched) when nothing was due after all."""
        if isinstance(chain, InvalidChain) or chain.writable_len < HDR_SIZE:
            q.add_used(chain.head, 0)
            return True
        hdr = self.muxer.produce_rx(skip_views(chain.writable_views(mem), HDR_SIZE))
        if hdr is None:
            return False
        chain.write(mem, hdr.pack())
        q.add_used(chain.head, HDR_SIZE + hdr.len)
        self.rx_packets += 1
        return True

    def debug_state(self) -> dict[str, object]:
        # Where the host side is: how `Sandbox.attach` and `evmm exec` find the guest agent from query-vm.
        return {"vsock": {"cid": self.guest_cid, "path": str(self.muxer.path)}}

    # ---- events and reset -------------------------------------------------------------------------------------

    def transport_reset(self) -> None:
        """The host side lost every connection (e.g. its backend was replaced): tell the driver (§5.10.6.7).

        Linux then resets all its vsock sockets and reads the guest CID again.
        """
        self.muxer.stop()
        if self.ctx is not None:
            self.muxer.start(self.ctx.reactor, self._wake_rx)
            self._events.transport_reset(self.ctx)

    def reset(self) -> None:
        """The driver reset the device: every connection is dropped (its queues are gone, so no event)."""
        self.muxer.stop()
        self._events.clear()
        self._tx_stalled = False
        super().reset()

    def close(self) -> None:
        self.muxer.close()


__all__ = ["VirtioVsock", "skip_views"]
