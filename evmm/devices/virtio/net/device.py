"""virtio-net (virtio 1.2 §5.1) on a tap: receiveq1 (0) and transmitq1 (1), no control queue.

TX: on a kick, every available chain is gathered as zero-copy views of guest memory behind a checked copy of
its 12-byte header and written to the tap with one ``writev``; one interrupt per batch.

RX: the tap fd is on the reactor only while the driver has receive buffers (backpressure).  A frame is read
whole into a host buffer first, because neither a tap nor a socket says how long the next frame is, and then
copied into as many chains as it needs (one without VIRTIO_NET_F_MRG_RXBUF).  When the buffers run out the
reader comes off the reactor and the device asks for a kick; the kick puts it back.  At most one frame is ever
read ahead of the buffers to hold it, and it is kept, not lost, until they come.

MRG_RXBUF is offered.  Without it a driver that takes TSO must post 64 KiB buffers (Linux's "big packets": an
indirect chain of 19 descriptors and pages per buffer, ~19 MiB for a 256-entry ring, a whole one for every
60-byte ACK); with it Linux posts single page-sized buffers and a large frame spans several (§5.1.6.3,
§5.1.6.4).  scripts/bench_net.py measures the trade here: small frames cost this device 3-5x less with merged
buffers (one 1-descriptor chain to walk instead of 19), a 64 KiB frame 1.2-2x more (16 chains instead of one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
from typing import Protocol

from evmm.devices.virtio.chain import DescriptorChain, InvalidChain
from evmm.devices.virtio.device import COMMON_FEATURES, CONFIG_CHANGE, VIRTIO_ID_NET, Activation, VirtioDevice
from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.tap import tap_offloads
from evmm.devices.virtio.queue import QueueBroken, Virtqueue
from evmm.errors import GuestMemoryError
from evmm.log import log
from evmm.memory import GuestMemory
from evmm.record import record

RX = 0
TX = 1
QUEUE_SIZE = 256
RX_BUDGET = 64  # frames per reactor callback, so one busy NIC cannot starve the other fds
TX_BUDGET = 256  # chains per pass; the rest go on in a call_soon
IOV_MAX = 1024  # writev's limit (<limits.h>)
READ_ERRORS = 16  # failed tap reads in a row before the reader rests
READ_RETRY = 1.0  # seconds it rests
VIRTIO_NET_S_LINK_UP = 1
_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu (§5.1.4)

OFFLOAD_FEATURES = (
    h.VIRTIO_NET_F_CSUM
    | h.VIRTIO_NET_F_GUEST_CSUM
    | h.VIRTIO_NET_F_GUEST_TSO4
    | h.VIRTIO_NET_F_GUEST_TSO6
    | h.VIRTIO_NET_F_GUEST_ECN
    | h.VIRTIO_NET_F_HOST_TSO4
    | h.VIRTIO_NET_F_HOST_TSO6
    | h.VIRTIO_NET_F_HOST_ECN
)


def net_features(*, mtu: int | None, mergeable: bool = True, offloads: bool = True) -> int:
    """The feature bits a NIC offers whatever moves its frames (evmm's RX/TX or the kernel's vhost-net)."""
    return (
        COMMON_FEATURES
        | h.VIRTIO_NET_F_MAC
        | h.VIRTIO_NET_F_STATUS
        | (h.VIRTIO_NET_F_MRG_RXBUF if mergeable else 0)
        | (OFFLOAD_FEATURES if offloads else 0)
        | (h.VIRTIO_NET_F_MTU if mtu is not None else 0)
    )


def net_config(mac: bytes, link_up: bool, mtu: int | None, max_pairs: int = 1) -> bytes:
    """struct virtio_net_config up to mtu (§5.1.4): max_virtqueue_pairs counts only with VIRTIO_NET_F_MQ."""
    return _CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP if link_up else 0, max_pairs, mtu or 0)


def valid_mtu(mtu: int | None) -> int | None:
    """§5.1.4.1: an MTU outside 68..65535 cannot be offered."""
    return mtu if mtu is not None and 68 <= mtu <= 65535 else None


class TapBackend(Protocol):
    """What the device needs of its tap (tests use a socketpair, which keeps frame boundaries as a tap does)."""

    @property
    def fd(self) -> int: ...

    def set_offload(self, flags: int) -> None: ...

    def close(self) -> None: ...


def clear_offloads(tap: TapBackend) -> None:
    """At reset: no driver takes offloaded frames any more (best effort: a tap gone bad is closed later)."""
    if tap.fd >= 0:
        try:
            tap.set_offload(0)
        except OSError:
            pass


class NoTap:
    """The backend of an empty hot-replace slot: no fd; the link is down, so the driver sends nothing."""

    fd = -1

    def set_offload(self, flags: int) -> None:
        pass

    def close(self) -> None:
        pass


@record
class NetStats:
    """Counters for metrics.  Bytes count Ethernet frames, without the virtio-net header."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0  # frames read from the tap and not delivered (too large, bad header)
    rx_bad_chains: int = 0  # receive chains returned empty because they were malformed
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0  # chains not sent (malformed, bad header, refused by the tap)
    last_drop: str = ""


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    name = "virtio-net"

    def __init__(
        self,
        tap: TapBackend,
        mac: bytes,
        *,
        mtu: int | None = None,
        mergeable: bool = True,
        offloads: bool = True,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        super().__init__((queue_size, queue_size))
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.tap = tap
        self.mac = mac
        self.mtu = valid_mtu(mtu)
        self._offered = net_features(mtu=self.mtu, mergeable=mergeable, offloads=offloads)
        self.stats = NetStats()
        self._reactor: asyncio.AbstractEventLoop | None = None
        self._features = 0
        self._reading = False  # the tap fd is registered for reading
        self._writing = False  # TX waits for the tap to take more (a writev would block)
        self._tx_again: asyncio.Handle | None = None
        self._read_errors = 0
        self._rx_retry: asyncio.TimerHandle | None = None
        # RX: the frame read ahead (header + frame in _rx_buf, length _pending, 0 for none) and the chains
        # popped to hold it.  One byte more than the largest frame tells a truncated read from a full one.
        self._rx_buf = bytearray(h.HDR_LEN + h.MAX_FRAME + 1)
        self._rx_view = memoryview(self._rx_buf)
        self._pending = 0
        self._held: list[DescriptorChain] = []
        self._held_bytes = 0
        self._held_descs = 0

    @classmethod
    def empty(cls, mac: bytes) -> VirtioNet:
        """A NIC with no backend (a hot-replace slot): link down until ``replace_tap`` gives it a tap."""
        return cls(NoTap(), mac)

    @property
    def link_up(self) -> bool:
        return self.tap.fd >= 0

    def replace_tap(self, tap: TapBackend | None) -> None:
        """Swap the backend while the guest runs (None empties the slot); on the reactor.

        The link status follows (VIRTIO_NET_S_LINK_UP, §5.1.4) and a configuration change interrupt tells
        the driver (§2.5.2, §5.1.4.2), which turns the carrier on or off.  Receive buffers the driver gave
        stay held for the new tap; a frame read from the old one and not yet delivered is dropped.
        """
        self._stop_io()
        if self._pending:
            self._drop("the backend was replaced with a frame pending")
        old, self.tap = self.tap, tap if tap is not None else NoTap()
        old.close()
        ctx = self.ctx
        if ctx is None:
            return
        try:
            self.tap.set_offload(tap_offloads(self._features))
        except OSError as e:
            ctx.interrupt.needs_reset(
                f"the new tap refused offloads {tap_offloads(self._features):#x}: {e.strerror}"
            )
            return
        ctx.interrupt.trigger(CONFIG_CHANGE)
        self._rx_resume()
        self._tx()

    # ---- what the transport asks ---------------------------------------------------------------------

    def features(self) -> int:
        return self._offered

    def config(self) -> bytes:
        return net_config(self.mac, self.link_up, self.mtu)

    @property
    def rx_paused(self) -> bool:
        """True while the device waits for receive buffers (the tap fd is off the reactor)."""
        return self.ctx is not None and not self._reading

    def activate(self, ctx: Activation) -> None:
        super().activate(ctx)
        self._reactor = ctx.reactor
        self._features = ctx.features
        try:
            self.tap.set_offload(tap_offloads(ctx.features))
        except OSError as e:
            ctx.interrupt.needs_reset(
                f"the tap refused offloads {tap_offloads(ctx.features):#x}: {e.strerror}"
            )
            return
        self._rx_resume()

    def queue_notify(self, index: int) -> None:
        if index == RX:
            self._rx_resume()
        elif index == TX:
            self._tx()

    def reset(self) -> None:
        self._stop_io()
        if self._pending:
            self._drop("device reset with a frame pending")
        self._held.clear()
        self._held_bytes = self._held_descs = 0
        self._features = 0
        clear_offloads(self.tap)
        super().reset()

    def close(self) -> None:
        self._stop_io()
        self.tap.close()

    def debug_state(self) -> dict[str, object]:
        return {
            "rx_reading": self._reading,  # the tap is on the reactor (False: waiting for receive buffers)
            "rx_pending": self._pending,  # bytes of a frame read from the tap and not yet placed
            "rx_held_chains": len(self._held),
            "tx_blocked": self._writing,  # the tap refused a write; waiting for it to drain
            "stats": dataclasses.asdict(self.stats),
        }

    # ---- plumbing ---------------------------------------------------------------------------------------

    def _queue(self, index: int) -> Virtqueue | None:
        ctx = self.ctx
        return ctx.queues[index] if ctx is not None and index < len(ctx.queues) else None

    def _set_reader(self, on: bool) -> None:
        if on == self._reading or self._reactor is None or (on and self.tap.fd < 0):
            return
        if on:
            self._reactor.add_reader(self.tap.fd, self._rx)
        else:
            self._reactor.remove_reader(self.tap.fd)
        self._reading = on

    def _stop_io(self) -> None:
        self._set_reader(False)
        if self._writing and self._reactor is not None:
            self._reactor.remove_writer(self.tap.fd)
        self._writing = False
        if self._tx_again is not None:
            self._tx_again.cancel()
            self._tx_again = None
        if self._rx_retry is not None:
            self._rx_retry.cancel()
            self._rx_retry = None

    def _broken(self, reason: str) -> None:
        """The driver broke a ring: stop touching it until it resets the device (§2.1.2)."""
        self._stop_io()
        if self.ctx is not None:
            self.ctx.interrupt.needs_reset(reason)

    def _drop(self, reason: str) -> None:
        self.stats.rx_drops += 1
        self.stats.last_drop = reason
        self._pending = 0

    # ---- RX (§5.1.6.3, §5.1.6.4) --------------------------------------------------------------------------

    def _rx_resume(self) -> None:
        """Activation or an RX kick: there may be buffers again, so read the tap again."""
        self._rx_retry = None
        q = self._queue(RX)
        if q is None:
            return
        q.set_notification(False)  # no kicks needed while the reader runs
        self._set_reader(True)
        self._rx()

    def _rx(self) -> None:
        ctx, q = self.ctx, self._queue(RX)
        if ctx is None or q is None or self.tap.fd < 0:
            return
        used = 0
        try:
            for _ in range(RX_BUDGET):
                if not self._pending:
                    if not self._held and not q.has_available():
                        if self._rx_wait(q):
                            break
                        continue
                    got = self._read_frame()
                    if got is None:
                        break
                    if not got:
                        continue
                n, waiting = self._place(q)
                used += n
                if waiting and self._rx_wait(q):
                    break
        except (QueueBroken, GuestMemoryError) as e:
            self._broken(str(e))
            return
        if used:
            ctx.signal_used(q)

    def _rx_wait(self, q: Virtqueue) -> bool:
        """Out of buffers: ask for a kick, then look once more (the driver may have added some before it saw
        the request, §2.7.10); True when there really are none and the reader is off."""
        q.set_notification(True)
        if q.has_available():
            return False
        self._set_reader(False)
        return True

    def _read_frame(self) -> bool | None:
        """Read one frame into the RX buffer: True if it is pending, False if dropped, None if none came."""
        try:
            n = os.readv(self.tap.fd, [self._rx_buf])
        except BlockingIOError:
            return None
        except OSError as e:
            # The tap has dropped the frame it could not hand over (drivers/net/tun.c frees it), so reading goes
            # on; only errors that persist (a tap gone bad) rest the reader, which retries a little later.
            self._drop(f"reading the tap failed: {e.strerror}")
            self._read_errors += 1
            if self._read_errors < READ_ERRORS:
                return False
            log.warning(
                "%s: reading the tap keeps failing (%s); retrying in %g s", self.name, e.strerror, READ_RETRY
            )
            self._read_errors = 0
            self._set_reader(False)
            if self._reactor is not None:
                self._rx_retry = self._reactor.call_later(READ_RETRY, self._rx_resume)
            return None
        self._read_errors = 0
        if n == 0:  # a tap never reads 0; a socket backend does when its peer is gone
            self._set_reader(False)
            return None
        if n > h.HDR_LEN + h.MAX_FRAME:
            self._drop(f"a frame longer than {h.MAX_FRAME} bytes")
            return False
        if n < h.HDR_LEN:
            self._drop(f"a {n}-byte read is shorter than the virtio-net header")
            return False
        hdr = h.NetHeader.parse(self._rx_buf)
        mtu = self.mtu if self._features & h.VIRTIO_NET_F_MTU else None
        why = h.check_rx(hdr, n - h.HDR_LEN, self._features, mtu)
        if why is not None:
            self._drop(why)
            return False
        h.rx_header(hdr, self._features, 1).pack_into(self._rx_buf)
        self._pending = n
        return True

    def _place(self, q: Virtqueue) -> tuple[int, bool]:
        """Copy the pending frame into chains; (used entries added, whether it waits for more buffers)."""
        ctx = self.ctx
        assert ctx is not None
        need = self._pending
        mergeable = bool(self._features & h.VIRTIO_NET_F_MRG_RXBUF)
        used = 0
        while not self._held or (mergeable and self._held_bytes < need):
            chain = q.pop(ctx.mem)
            if chain is None:
                if self._held_descs >= q.size:
                    # Every slot of the ring is ours and the frame still does not fit: it never will.
                    self._drop(f"a {need - h.HDR_LEN}-byte frame is larger than all receive buffers together")
                    return used, False
                return used, True
            if isinstance(chain, InvalidChain) or chain.readable_len or chain.writable_len < h.HDR_LEN:
                # Receive chains are device-writable only and hold at least a header (§5.1.6.3.1).
                q.add_used(chain.head, 0)
                self.stats.rx_bad_chains += 1
                used += 1
                continue
            self._held.append(chain)
            self._held_bytes += chain.writable_len
            self._held_descs += len(chain.descriptors)
        if not mergeable and self._held[0].writable_len < need:
            self._drop(f"a {need - h.HDR_LEN}-byte frame is larger than the receive buffer")
            return used, False  # the chain stays held for the next frame
        # All chains but the last are filled to their full length (§5.1.6.4.1).
        count, room = 0, 0
        while room < need:
            room += self._held[count].writable_len
            count += 1
        h.set_num_buffers(self._rx_buf, count)
        offset = 0
        for chain in self._held[:count]:
            n = min(chain.writable_len, need - offset)
            _scatter(ctx.mem, chain, self._rx_view[offset : offset + n])
            q.fill_used(chain.head, n)
            offset += n
            self._held_bytes -= chain.writable_len
            self._held_descs -= len(chain.descriptors)
        # One index store for the whole frame: a driver polling the ring must never see its first buffers
        # without the rest (it would take the next frame's for them, or drop this one).
        q.publish_used()
        del self._held[:count]
        self.stats.rx_packets += 1
        self.stats.rx_bytes += need - h.HDR_LEN
        self._pending = 0
        return used + count, False

    # ---- TX (§5.1.6.2) --------------------------------------------------------------------------------------

    def _tx(self) -> None:
        self._tx_again = None
        ctx, q = self.ctx, self._queue(TX)
        if ctx is None or q is None or self._writing:
            return
        used = 0
        try:
            q.set_notification(False)
            for _ in range(TX_BUDGET):
                chain = q.pop(ctx.mem)
                if chain is None:
                    q.set_notification(True)
                    if q.has_available():
                        continue
                    break
                if isinstance(chain, InvalidChain):
                    self._tx_drop(chain.reason)
                elif not self._send(chain):
                    q.undo_pop()
                    self._writing = True
                    ctx.reactor.add_writer(self.tap.fd, self._tx_writable)
                    break
                q.add_used(chain.head, 0)
                used += 1
            else:
                self._tx_again = ctx.reactor.call_soon(self._tx)
        except (QueueBroken, GuestMemoryError) as e:
            self._broken(str(e))
            return
        if used:
            ctx.signal_used(q)

    def _tx_writable(self) -> None:
        if self._reactor is not None and self._writing:
            self._reactor.remove_writer(self.tap.fd)
        self._writing = False
        self._tx()

    def _tx_drop(self, reason: str) -> None:
        self.stats.tx_drops += 1
        self.stats.last_drop = reason

    def _send(self, chain: DescriptorChain) -> bool:
        """Write one frame to the tap; False if the tap would block (the chain is then retried)."""
        ctx = self.ctx
        assert ctx is not None
        if chain.writable_len:
            self._tx_drop("a transmit chain with device-writable buffers")
            return True
        if self.tap.fd < 0:
            self._tx_drop("no backend: the slot is empty")
            return True
        total = chain.readable_len
        if total < h.HDR_LEN:
            self._tx_drop(f"a {total}-byte transmit chain is shorter than the virtio-net header")
            return True
        # Zero-length descriptors are skipped: the chain walk does not bounds-check their addresses.
        views = [ctx.mem.view(d.addr, d.length) for d in chain.descriptors if d.length]
        raw, frame = _split_header(views)
        # Parsed from a private copy: the guest can change its buffer under us, not the header we checked.
        hdr = h.NetHeader.parse(raw)
        why = h.check_tx(hdr, total - h.HDR_LEN, self._features)
        if why is not None:
            self._tx_drop(why)
            return True
        iov: list[bytes | memoryview] = [h.tap_tx_header(hdr), *frame]
        if len(iov) > IOV_MAX:
            iov = [iov[0], b"".join(frame)]
        try:
            os.writev(self.tap.fd, iov)
        except BlockingIOError:
            return False
        except OSError as e:
            self._tx_drop(f"the tap refused a frame: {e.strerror}")
            return True
        self.stats.tx_packets += 1
        self.stats.tx_bytes += total - h.HDR_LEN
        return True


def _scatter(mem: GuestMemory, chain: DescriptorChain, data: memoryview) -> None:
    """Copy ``data`` into the chain's writable buffers from the start (the caller made sure it fits)."""
    done = 0
    for d in chain.descriptors:
        if done >= len(data):
            break
        if d.writable and d.length:
            n = min(d.length, len(data) - done)
            mem.view(d.addr, n)[:] = data[done : done + n]
            done += n


def _split_header(views: list[memoryview]) -> tuple[bytes, list[memoryview]]:
    """A copy of the first HDR_LEN bytes, and the rest as views (the header may span descriptors)."""
    first = views[0]
    if len(first) >= h.HDR_LEN:
        rest = [first[h.HDR_LEN :], *views[1:]] if len(first) > h.HDR_LEN else views[1:]
        return bytes(first[: h.HDR_LEN]), rest
    raw = bytearray()
    frame: list[memoryview] = []
    for v in views:
        take = min(len(v), h.HDR_LEN - len(raw))
        raw += v[:take]
        if take < len(v):
            frame.append(v[take:])
    return bytes(raw), frame
