"""virtio-net through the driver-side fake, against a fake tap: a SOCK_SEQPACKET socketpair, which keeps frame
boundaries as a tap does.  Runs on both reactors evmm may use (asyncio's and uvloop)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from evmm.config.devspec import NetSpec
from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.chain import VIRTQ_DESC_F_NEXT
from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from evmm.devices.virtio.net import default_mac, parse_mac
from evmm.devices.virtio.net import device as net_device
from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.device import TX_BUDGET, VirtioNet
from evmm.devices.virtio.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN
from evmm.devices.virtio.queue import Virtqueue
from evmm.errors import ConfigError
from tests.fakes.virtio_driver import MmioDriver, Used

MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")
ALL = (1 << 64) - 1
NO_MRG = ALL & ~h.VIRTIO_NET_F_MRG_RXBUF
SO_SNDBUFFORCE = 32  # <asm-generic/socket.h>
PLAIN = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | h.VIRTIO_NET_F_MAC  # no offloads, no merging


class FakeTap:
    """The device's end of a socketpair; the test plays the host network on the other end."""

    def __init__(self) -> None:
        self.dev_end, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dev_end.setblocking(False)
        self.host.setblocking(False)
        self.offloads: list[int] = []

    @property
    def fd(self) -> int:
        return self.dev_end.fileno()

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def close(self) -> None:
        self.dev_end.close()

    def send(self, frame: bytes, hdr: h.NetHeader | None = None) -> None:
        self.host.send((hdr or h.NetHeader()).pack() + frame)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.host.recv(1 << 17))
            except BlockingIOError:
                return out

    def queued_for_device(self) -> bytes | None:
        """The next frame still waiting in the "tap" for the device (read without consuming it)."""
        try:
            return self.dev_end.recv(1 << 17, socket.MSG_PEEK)
        except BlockingIOError:
            return None


# The device runs on either loop evmm may use (the `loop` fixture, tests/conftest.py).
LOOP_KINDS = ("asyncio", "uvloop")


@pytest.fixture
def tap() -> Iterator[FakeTap]:
    t = FakeTap()
    yield t
    t.dev_end.close()
    t.host.close()


def spin(loop: asyncio.AbstractEventLoop, until: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out waiting for the device"
        loop.run_until_complete(asyncio.sleep(0.001))


def settle(loop: asyncio.AbstractEventLoop, seconds: float = 0.02) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def frame(size: int, seed: int = 0) -> bytes:
    """An Ethernet frame of ``size`` bytes with a recognisable payload."""
    body = bytes((seed + i) & 0xFF for i in range(size - 14))
    return MAC + HOST_MAC + b"\x08\x00" + body


def up(
    loop: asyncio.AbstractEventLoop,
    tap: FakeTap,
    features: int = ALL,
    *,
    queue_size: int = 256,
    event_idx: bool = True,
    **kw: object,
) -> tuple[VirtioNet, MmioDriver]:
    dev = VirtioNet(tap, MAC, queue_size=max(queue_size, 256), **kw)  # type: ignore[arg-type]
    d = MmioDriver(dev, loop=loop, features=features)
    d.bring_up(queue_size, event_idx=event_idx)
    return dev, d


def post_rx(d: MmioDriver, *sizes: int, kick: bool = True) -> list[int]:
    heads = [d.queues[0].add([], [n]) for n in sizes]
    if kick:
        d.kick(0)
    return heads


def rx_packets(used: list[Used]) -> list[bytes]:
    """Reassemble what the driver received: each packet's header says how many used buffers it spans."""
    out, i = [], 0
    while i < len(used):
        count = struct.unpack_from("<H", used[i].data, 10)[0]
        assert count >= 1
        out.append(b"".join(u.data for u in used[i : i + count]))
        i += count
    return out


# ---- config and features ------------------------------------------------------------------------------


def test_config_space_and_features(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap, mtu=1500)
    assert bytes(d.config(i, 1) for i in range(6)) == MAC
    assert d.config(6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    assert d.config(8, 2) == 1  # max_virtqueue_pairs
    assert d.config(10, 2) == 1500
    offered = d.device_features()
    for bit in (h.VIRTIO_NET_F_MAC, h.VIRTIO_NET_F_STATUS, h.VIRTIO_NET_F_MRG_RXBUF, h.VIRTIO_NET_F_MTU):
        assert offered & bit
    assert offered & h.VIRTIO_NET_F_GUEST_TSO4 and offered & h.VIRTIO_NET_F_HOST_TSO6
    assert not offered & h.VIRTIO_NET_F_CTRL_VQ
    assert dev.queue_sizes == (256, 256)


def test_no_mtu_feature_without_an_mtu(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    _, d = up(loop, tap)
    assert not d.device_features() & h.VIRTIO_NET_F_MTU
    other = FakeTap()
    assert not up(loop, other, mtu=40)[1].device_features() & h.VIRTIO_NET_F_MTU  # below 68: not offered
    other.close()
    other.host.close()


@pytest.mark.parametrize(
    ("features", "offloads"),
    [
        (ALL, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN),
        (PLAIN | h.VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
        (PLAIN | h.VIRTIO_NET_F_GUEST_CSUM | h.VIRTIO_NET_F_GUEST_TSO4, TUN_F_CSUM | TUN_F_TSO4),
        (PLAIN | h.VIRTIO_NET_F_GUEST_TSO4, 0),  # TSO without GUEST_CSUM is meaningless (§5.1.3.1)
        (PLAIN, 0),
    ],
)
def test_tap_offloads_follow_what_the_driver_negotiated(
    loop: asyncio.AbstractEventLoop, tap: FakeTap, features: int, offloads: int
) -> None:
    _, d = up(loop, tap, features)
    assert tap.offloads[-1] == offloads
    d.w(regs.STATUS, 0)  # reset: back to no offloads until the next driver says otherwise
    assert tap.offloads[-1] == 0


def test_offloads_can_be_withheld(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    _, d = up(loop, tap, offloads=False, mergeable=False)
    offered = d.device_features()
    assert not offered & (h.VIRTIO_NET_F_CSUM | h.VIRTIO_NET_F_GUEST_CSUM | h.VIRTIO_NET_F_MRG_RXBUF)
    assert tap.offloads[-1] == 0


def test_default_mac_is_local_unicast_stable_and_distinct() -> None:
    a = default_mac(NetSpec(tap="tap0"), 0)
    assert a[:3] == b"\x52\x54\x00" and not a[0] & 1 and a[0] & 2
    assert a == default_mac(NetSpec(tap="tap0"), 0)
    assert a != default_mac(NetSpec(tap="tap1"), 0)
    assert a != default_mac(NetSpec(tap="tap0"), 1)
    assert default_mac(NetSpec(fd=5), 0)[:3] == b"\x52\x54\x00"


def test_parse_mac() -> None:
    assert parse_mac("52:54:00:12:34:56") == MAC
    with pytest.raises(ConfigError, match="not a MAC"):
        parse_mac("52:54:00:12:34")


# ---- TX ----------------------------------------------------------------------------------------------


def test_tx_frames_reach_the_tap_whatever_the_layout(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    q = d.queues[1]
    hdr = h.NetHeader().pack()
    frames = [frame(60, 1), frame(1514, 2), frame(200, 3), frame(100, 4), frame(64, 5)]
    q.add([hdr + frames[0]], [])  # header and frame in one buffer, as Linux does with headroom
    q.add([hdr, frames[1]], [])  # header apart
    q.add([hdr[:5], hdr[5:9], hdr[9:] + frames[2][:7], frames[2][7:]], [])  # header split three ways
    q.add([hdr, frames[3][:50], frames[3][50:]], [], indirect=True)
    q.add([hdr, b"", frames[4]], [])  # a zero-length buffer in the middle
    d.kick(1)
    assert tap.received() == [hdr + f for f in frames]
    used = q.get_used()
    assert [u.length for u in used] == [0] * 5  # nothing written to a TX chain
    assert d.irq.count == 1  # one interrupt for the batch
    assert dev.stats.tx_packets == 5 and dev.stats.tx_bytes == sum(map(len, frames))
    assert dev.stats.tx_drops == 0


def test_tx_checksum_and_tso_requests_pass_to_the_tap(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    _, d = up(loop, tap)
    f = frame(9000)
    hdr = h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 54, 1448, 34, 16)
    d.queues[1].add([hdr.pack() + f], [])
    d.kick(1)
    assert tap.received() == [hdr.pack() + f]


def test_tx_header_is_normalised(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    _, d = up(loop, tap)
    f = frame(60)
    sloppy = h.NetHeader(flags=h.F_DATA_VALID | 0x40, num_buffers=7)  # bits the driver must not set
    d.queues[1].add([sloppy.pack() + f], [])
    d.kick(1)
    assert tap.received() == [h.NetHeader().pack() + f]


def test_tx_requests_that_were_not_negotiated_are_dropped(
    loop: asyncio.AbstractEventLoop, tap: FakeTap
) -> None:
    dev, d = up(loop, tap, PLAIN)
    q = d.queues[1]
    q.add([h.NetHeader(h.F_NEEDS_CSUM, 0, 0, 0, 34, 16).pack() + frame(60)], [])
    q.add([h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 54, 1448, 34, 16).pack() + frame(3000)], [])
    q.add([h.NetHeader().pack() + frame(60, 9)], [])
    d.kick(1)
    assert tap.received() == [h.NetHeader().pack() + frame(60, 9)]
    assert len(q.get_used()) == 3
    assert dev.stats.tx_drops == 2 and dev.stats.tx_packets == 1


def test_tx_hostile_chains_fail_only_themselves(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    q = d.queues[1]
    good = h.NetHeader().pack() + frame(80)
    q.add([], [1500])  # writable buffers only
    q.add([b"\0" * 8], [])  # shorter than the header
    q.add([h.NetHeader().pack() + b"\0" * 6], [])  # header and a runt frame
    q.add([good], [64])  # a readable frame with a writable tail
    q.add([good], [])
    d.kick(1)
    assert tap.received() == [good]
    used = q.get_used()
    assert len(used) == 5 and all(u.length == 0 for u in used)
    assert dev.stats.tx_drops == 4
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET == 0


def test_tx_malformed_chain_is_completed_and_the_queue_goes_on(
    loop: asyncio.AbstractEventLoop, tap: FakeTap
) -> None:
    dev, d = up(loop, tap, queue_size=8)
    q = d.queues[1]
    # A descriptor that points outside guest RAM, then a loop: both invalid chains, each completed empty.
    q.add_raw([(0xFFFF_F000_0000, 100, 0, 0)], head=0)
    d.kick(1)
    q.add_raw([(0x200000, 100, VIRTQ_DESC_F_NEXT, 0)], head=0)
    d.kick(1)
    used = q.get_used()
    assert [(u.head, u.length) for u in used] == [(0, 0), (0, 0)]
    assert dev.stats.tx_drops == 2 and tap.received() == []
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET == 0


def test_tx_waits_for_a_full_tap_and_loses_nothing(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    tap.dev_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dev, d = up(loop, tap)
    q = d.queues[1]
    frames = [frame(1000, i) for i in range(100)]
    for f in frames:
        q.add([h.NetHeader().pack() + f], [])
    d.kick(1)
    got = tap.received()
    assert 0 < len(got) < len(frames)  # the "tap" filled up part way
    deadline = time.monotonic() + 3
    while len(got) < len(frames) and time.monotonic() < deadline:
        settle(loop, 0.002)
        got += tap.received()
    assert got == [h.NetHeader().pack() + f for f in frames]
    assert dev.stats.tx_drops == 0
    assert len(q.get_used()) == len(frames)


def test_tx_more_than_a_budget_in_one_kick(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    try:
        tap.dev_end.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
    except PermissionError:
        pytest.skip("needs CAP_NET_ADMIN to give the fake tap room for a whole budget of frames")
    dev, d = up(loop, tap, queue_size=512)
    q = d.queues[1]
    n = TX_BUDGET + 40
    for i in range(n):
        q.add([h.NetHeader().pack() + frame(60, i)], [])
    d.kick(1)
    got = tap.received()
    assert len(got) == TX_BUDGET  # the rest waits for the reactor's next turn
    spin(loop, lambda: dev.stats.tx_packets == n)
    assert len(got + tap.received()) == n


def test_tx_asks_for_kicks_when_its_ring_is_empty(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    _, d = up(loop, tap)
    q = d.queues[1]
    for i in range(3):
        q.add([h.NetHeader().pack() + frame(60, i)], [])
    d.kick(1)
    assert q.avail_event() == 3  # EVENT_IDX: kick me when you publish index 3 (§2.7.10)


# ---- RX ----------------------------------------------------------------------------------------------


def test_rx_delivers_frames_with_a_header(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    post_rx(d, *[4096] * 8)
    frames = [frame(60, 1), frame(1514, 2), frame(300, 3)]
    for f in frames:
        tap.send(f)
    spin(loop, lambda: dev.stats.rx_packets == 3)
    used = d.queues[0].get_used()
    assert rx_packets(used) == [h.NetHeader(num_buffers=1).pack() + f for f in frames]
    assert [u.length for u in used] == [12 + len(f) for f in frames]
    assert dev.stats.rx_bytes == sum(map(len, frames))
    assert d.irq.count >= 1


def test_rx_large_frame_spans_buffers_when_merging(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    post_rx(d, *[4096] * 20)
    big = frame(60000, 7)
    hdr = h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 66, 1448, 34, 16)
    tap.send(big, hdr)
    tap.send(frame(60, 8))
    spin(loop, lambda: dev.stats.rx_packets == 2)
    used = d.queues[0].get_used()
    count = -(-(60000 + 12) // 4096)
    assert len(used) == count + 1
    assert all(u.length == 4096 for u in used[: count - 1])  # all but the last filled (§5.1.6.4.1)
    packets = rx_packets(used)
    assert packets[0] == h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 66, 1448, 34, 16, count).pack() + big
    assert packets[1] == h.NetHeader(num_buffers=1).pack() + frame(60, 8)


def test_rx_merged_frame_is_published_whole(
    loop: asyncio.AbstractEventLoop, tap: FakeTap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The used index moves past a merged frame's buffers in one store: Linux's driver reads num_buffers from
    the first buffer and takes the rest at once, so an index published part-way through a frame makes it
    drop the frame and read the rest as frames of their own (with headers made of payload)."""
    published: list[int] = []
    publish = Virtqueue.publish_used

    def spy(q: Virtqueue) -> None:
        if q.index == 0:
            published.append(q.next_used)
        publish(q)

    monkeypatch.setattr(Virtqueue, "publish_used", spy)
    dev, d = up(loop, tap)
    post_rx(d, *[4096] * 20)
    tap.send(frame(60000, 7))
    tap.send(frame(60, 8))
    spin(loop, lambda: dev.stats.rx_packets == 2)
    count = -(-(60000 + 12) // 4096)
    assert published and set(published) <= {count, count + 1}
    assert rx_packets(d.queues[0].get_used())[1] == h.NetHeader(num_buffers=1).pack() + frame(60, 8)


def test_rx_big_buffers_without_merging(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap, NO_MRG)
    post_rx(d, *[65562] * 2)
    big = frame(65000, 3)
    tap.send(big, h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 66, 1448, 34, 16))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    (u,) = d.queues[0].get_used()
    assert u.data[12:] == big and struct.unpack_from("<H", u.data, 10)[0] == 1


def test_rx_frame_too_big_for_the_buffer_is_dropped(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap, NO_MRG)
    (head,) = post_rx(d, 1526)
    tap.send(frame(4000))
    tap.send(frame(100, 5))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    (u,) = d.queues[0].get_used()
    assert u.head == head  # the buffer the dropped frame could not use took the next one
    assert u.data == h.NetHeader(num_buffers=1).pack() + frame(100, 5)
    assert dev.stats.rx_drops == 1 and "larger" in dev.stats.last_drop


def test_rx_frame_larger_than_the_whole_ring_is_dropped(
    loop: asyncio.AbstractEventLoop, tap: FakeTap
) -> None:
    dev, d = up(loop, tap, queue_size=8)
    post_rx(d, *[64] * 8)
    tap.send(frame(1000))
    tap.send(frame(40, 1))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    assert dev.stats.rx_drops == 1
    (u,) = d.queues[0].get_used()
    assert u.data == h.NetHeader(num_buffers=1).pack() + frame(40, 1)


def test_rx_frame_over_the_largest_possible_is_dropped(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    tap.dev_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    tap.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    dev, d = up(loop, tap)
    post_rx(d, *[4096] * 40)
    tap.send(frame(h.MAX_FRAME + 1))
    tap.send(frame(h.MAX_FRAME, 1))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    assert dev.stats.rx_drops == 1
    assert rx_packets(d.queues[0].get_used())[0][12:] == frame(h.MAX_FRAME, 1)


def test_rx_backpressure_reads_nothing_without_buffers(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    frames = [frame(100, i) for i in range(3)]
    for f in frames:
        tap.send(f)
    settle(loop)
    assert dev.rx_paused
    assert tap.queued_for_device() == h.NetHeader().pack() + frames[0]  # nothing read ahead
    q = d.queues[0]
    assert q.avail_event() == q.avail_idx  # the device asked for a kick on the next buffer
    post_rx(d, 2048)
    spin(loop, lambda: dev.stats.rx_packets == 1)
    settle(loop)
    assert dev.rx_paused and dev.stats.rx_packets == 1
    assert tap.queued_for_device() == h.NetHeader().pack() + frames[1]
    post_rx(d, 2048, 2048)
    spin(loop, lambda: dev.stats.rx_packets == 3)
    assert rx_packets(q.get_used()) == [h.NetHeader(num_buffers=1).pack() + f for f in frames]
    assert dev.stats.rx_drops == 0


def test_rx_backpressure_without_event_idx(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap, event_idx=False)
    q = d.queues[0]
    tap.send(frame(100))
    settle(loop)
    assert dev.rx_paused
    assert d.mem.read_u16(q.used) == 0  # VRING_USED_F_NO_NOTIFY clear: kicks wanted
    post_rx(d, 2048, 2048)
    spin(loop, lambda: dev.stats.rx_packets == 1)
    assert not dev.rx_paused
    assert d.mem.read_u16(q.used) == 1  # reading with a buffer in hand: no kicks wanted
    tap.send(frame(100, 1))  # taken by the running reader, no kick involved
    spin(loop, lambda: dev.stats.rx_packets == 2)
    settle(loop)
    assert dev.rx_paused and d.mem.read_u16(q.used) == 0


def test_rx_frame_waiting_for_buffers_is_kept(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    post_rx(d, 1024)
    big = frame(3000)
    tap.send(big)
    tap.send(frame(60, 1))
    settle(loop)
    assert dev.rx_paused and dev.stats.rx_packets == 0 and dev.stats.rx_drops == 0
    assert tap.queued_for_device() == h.NetHeader().pack() + frame(60, 1)  # one frame read ahead, no more
    post_rx(d, 1024, 1024, 1024)
    spin(loop, lambda: dev.stats.rx_packets == 2)
    packets = rx_packets(d.queues[0].get_used())
    assert packets == [
        h.NetHeader(num_buffers=3).pack() + big,
        h.NetHeader(num_buffers=1).pack() + frame(60, 1),
    ]


def test_rx_buffer_added_while_pausing_is_not_missed(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    """A driver that adds a buffer after the device looked but before it asked for kicks sends no kick."""
    dev, d = up(loop, tap)
    post_rx(d, 2048)  # the reader runs
    assert dev.ctx is not None
    vq = dev.ctx.queue(0)
    real = vq.set_notification
    raced: list[int] = []

    def racing(enabled: bool) -> None:
        if enabled and not raced:
            raced.append(d.queues[0].add([], [2048]))  # no kick: notifications looked disabled
        real(enabled)

    vq.set_notification = racing  # type: ignore[method-assign]
    tap.send(frame(100))
    tap.send(frame(100, 1))
    spin(loop, lambda: dev.stats.rx_packets == 2)
    assert raced


def test_rx_hostile_chains_fail_only_themselves(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    q = d.queues[0]
    bad1 = q.add([b"driver data"], [2048])  # a readable buffer in a receive chain
    bad2 = q.add([], [8])  # shorter than the header
    good = q.add([], [2048])
    d.kick(0)
    tap.send(frame(100))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    used = q.get_used()
    assert [(u.head, u.length) for u in used] == [(bad1, 0), (bad2, 0), (good, 112)]
    assert dev.stats.rx_bad_chains == 2
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET == 0


def test_rx_headers_the_driver_cannot_take(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap, PLAIN)
    post_rx(d, *[2048] * 4)
    tap.send(frame(1000), h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 54, 500, 34, 16))  # TSO: not negotiated
    tap.send(frame(100), h.NetHeader(h.F_NEEDS_CSUM, 0, 0, 0, 34, 16))  # partial checksum: not negotiated
    tap.send(frame(100, 1), h.NetHeader(h.F_DATA_VALID))  # fine, but the flag is not this driver's to see
    spin(loop, lambda: dev.stats.rx_packets == 1)
    assert dev.stats.rx_drops == 2
    assert rx_packets(d.queues[0].get_used()) == [h.NetHeader(num_buffers=1).pack() + frame(100, 1)]


def test_rx_mtu_is_enforced(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap, mtu=1500)
    post_rx(d, *[4096] * 4)
    tap.send(frame(1500 + 14 + 4 + 1))
    tap.send(frame(1500 + 14, 1))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    assert dev.stats.rx_drops == 1


def test_rx_broken_ring_needs_reset_and_stops_reading(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    tap.send(frame(100))
    tap.send(frame(100, 1))
    d.queues[0].set_avail_idx(1000)  # more than a ring ahead
    d.kick(0)
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
    assert dev.rx_paused
    settle(loop)
    assert tap.queued_for_device() == h.NetHeader().pack() + frame(100, 1)  # no more reading
    assert dev.stats.rx_packets == 0


def test_rx_interrupts_are_batched(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    for i in range(20):
        tap.send(frame(100, i))
    post_rx(d, *[2048] * 20)  # the kick reads all 20 at once
    assert dev.stats.rx_packets == 20
    assert d.irq.count == 1


def test_rx_peer_gone_stops_the_reader(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    post_rx(d, 2048)
    tap.host.close()
    settle(loop)
    assert dev.rx_paused


def test_rx_read_error_drops_that_frame_only(
    loop: asyncio.AbstractEventLoop, tap: FakeTap, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tap read can fail for one frame (tun frees a GSO frame it cannot describe, EINVAL); reading goes on."""
    dev, d = up(loop, tap)
    post_rx(d, *[2048] * 4)
    real = os.readv
    failures = [1]

    def readv(fd: int, buffers: list[bytearray]) -> int:
        if failures:
            failures.pop()
            real(fd, buffers)  # the kernel consumed the frame, then failed
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers)

    monkeypatch.setattr(os, "readv", readv)
    tap.send(frame(100))
    tap.send(frame(100, 1))
    spin(loop, lambda: dev.stats.rx_packets == 1)  # no kick needed: the reader kept going
    assert dev.stats.rx_drops == 1 and "Invalid argument" in dev.stats.last_drop
    assert rx_packets(d.queues[0].get_used()) == [h.NetHeader(num_buffers=1).pack() + frame(100, 1)]


def test_rx_persistent_read_errors_rest_the_reader(
    loop: asyncio.AbstractEventLoop, tap: FakeTap, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev, d = up(loop, tap)
    post_rx(d, 2048)
    monkeypatch.setattr(net_device, "READ_RETRY", 0.05)
    real = os.readv
    broken = [True]

    def readv(fd: int, buffers: list[bytearray]) -> int:
        if broken[0]:
            raise OSError(errno.EBADFD, "File descriptor in bad state")
        return real(fd, buffers)

    monkeypatch.setattr(os, "readv", readv)
    tap.send(frame(100))
    spin(loop, lambda: dev.rx_paused)  # a busy loop on a dead fd would never get here
    assert dev.stats.rx_drops == net_device.READ_ERRORS
    broken[0] = False
    spin(loop, lambda: dev.stats.rx_packets == 1)  # the retry, without a kick


# ---- reset and close -----------------------------------------------------------------------------------


def test_reset_stops_reading_and_keeps_the_tap(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    post_rx(d, 2048)
    d.w(regs.STATUS, 0)
    assert not dev.activated and tap.fd >= 0
    tap.send(frame(100))
    settle(loop)
    assert tap.queued_for_device() is not None  # nobody reads after a reset
    # A new driver brings the device up again and gets the frame.
    d.queues.clear()
    d.bring_up()
    post_rx(d, 2048)
    spin(loop, lambda: dev.stats.rx_packets == 1)
    dev.reset()
    dev.close()
    assert tap.fd == -1


def test_transport_close_releases_the_tap(loop: asyncio.AbstractEventLoop, tap: FakeTap) -> None:
    dev, d = up(loop, tap)
    post_rx(d, 2048)
    assert not dev.rx_paused
    d.transport.close()
    assert tap.fd == -1


# ---- hot-replace slots (issue 5): an empty NIC whose tap comes and goes ----------------------------------


def test_an_empty_slot_has_its_link_down_and_drops_what_the_driver_sends(
    loop: asyncio.AbstractEventLoop,
) -> None:
    dev = VirtioNet.empty(MAC)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    assert d.config(6, 2) == 0  # VIRTIO_NET_S_LINK_UP clear
    post_rx(d, 4096)
    d.queues[1].add([h.NetHeader().pack() + frame(60)], [])
    d.kick(1)
    settle(loop)
    assert dev.stats.tx_drops == 1 and dev.stats.last_drop == "no backend: the slot is empty"
    assert d.queues[1].get_used() and not d.queues[0].get_used()


def test_a_tap_put_in_brings_the_link_up_and_carries_frames(
    loop: asyncio.AbstractEventLoop, tap: FakeTap
) -> None:
    dev = VirtioNet.empty(MAC)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    post_rx(d, 4096, 4096)  # buffers given while empty stay for the tap to come
    settle(loop)
    d.ack_interrupt()
    dev.replace_tap(tap)
    assert d.config(6, 2) == 1
    assert d.ack_interrupt() & regs.INT_CONFIG  # the driver is told the config changed (§2.5.2)
    assert tap.offloads and tap.offloads[-1] != 0  # the negotiated offloads reach the new tap
    tap.send(frame(100, 7))
    spin(loop, lambda: dev.stats.rx_packets == 1)
    d.queues[1].add([h.NetHeader().pack() + frame(80, 3)], [])
    d.kick(1)
    spin(loop, lambda: bool(tap.received()) or dev.stats.tx_packets == 1)
    assert dev.stats.tx_packets == 1


def test_taking_the_tap_out_closes_it_and_downs_the_link(
    loop: asyncio.AbstractEventLoop, tap: FakeTap
) -> None:
    dev, d = up(loop, tap)
    d.ack_interrupt()
    dev.replace_tap(None)
    assert tap.dev_end.fileno() == -1  # closed
    assert d.config(6, 2) == 0
    assert d.ack_interrupt() & regs.INT_CONFIG
    other = FakeTap()
    try:
        dev.replace_tap(other)
        post_rx(d, 4096)
        other.send(frame(64, 9))
        spin(loop, lambda: dev.stats.rx_packets == 1)
    finally:
        other.host.close()
        dev.close()
