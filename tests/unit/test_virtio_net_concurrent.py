"""virtio-net with the device and the driver running at the same time, as they do with a real guest.

The other virtio-net tests drive the device step by step.  Here the device runs on a uvloop reactor of its own
thread, kicked through eventfds (as KVM's ioeventfds do), while the test thread plays Linux's virtio_net
driver: it polls the used rings without waiting for interrupts (NAPI), takes each used element the moment
the index shows it, and checks what Linux checks (virtio_ring.c: an id in range that is in flight; a merged
frame's num_buffers elements all there when the first is seen, or Linux drops it, virtio_net.c
receive_mergeable), and that every frame arrives whole, once, in order, both ways.  A short switch interval
makes the two threads interleave inside the device's work, where a half-published ring would show.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.device import VirtioNet
from tests.fakes.vhost import FakeNotifyRegistrar
from tests.fakes.virtio_driver import DriverQueue, MmioDriver
from tests.unit.test_virtio_net import HOST_MAC, MAC, FakeTap

RX, TX = 0, 1
FRAMES = 600
DEADLINE = 60.0

LOOP_KINDS = ("uvloop",)  # evmm's reactor (the `loop` fixture, tests/conftest.py)


@pytest.fixture
def interleaved() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def numbered(seq: int, size: int) -> bytes:
    body = struct.pack("<I", seq) + bytes((seq + i) & 0xFF for i in range(size - 18))
    return MAC + HOST_MAC + b"\x08\x00" + body


def rx_header(size: int) -> h.NetHeader:
    # Frames over an MTU come as TSO (what a tap hands over with GUEST_TSO4 negotiated).
    if size <= 1514:
        return h.NetHeader()
    return h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 66, 1448, 34, 16)


class LinuxLikeRx:
    """Mergeable receive as Linux does it: 1536..4096-byte buffers kept posted, frames reassembled."""

    def __init__(self, q: DriverQueue, kick: int) -> None:
        self.q = q
        self.kick = kick
        self.frames: list[bytes] = []
        self._pending: list[bytes] = []
        self._need = 0
        self._sizes = iter(range(10**9))

    def refill(self) -> None:
        posted = 0
        while self.q.free:
            self.q.add([], [1536 + (next(self._sizes) * 257) % 2561])
            posted += 1
        if posted:
            os.eventfd_write(self.kick, 1)

    def poll(self) -> None:
        for u in self.q.get_used():  # asserts each id is in range and in flight
            if not self._need:
                assert u.length >= h.HDR_LEN, f"a {u.length}-byte first buffer"
                self._need = struct.unpack_from("<H", u.data, 10)[0]
                assert self._need >= 1
                self._pending = [u.data[h.HDR_LEN :]]
            else:
                self._pending.append(u.data)
            self._need -= 1
            if not self._need:
                self.frames.append(b"".join(self._pending))
        # Linux takes a frame's other buffers at once: none may still be missing once the index was read.
        assert not self._need, f"{self._need} buffers of a merged frame were not published with its first"


def test_rx_and_tx_while_the_driver_polls_concurrently(
    interleaved: None, loop: asyncio.AbstractEventLoop
) -> None:
    tap = FakeTap()
    notify = FakeNotifyRegistrar()
    dev = VirtioNet(tap, MAC, queue_size=256)
    d = MmioDriver(dev, loop=loop, notify=notify)
    d.bring_up(256)
    rxq, txq = d.queues[RX], d.queues[TX]
    reactor = threading.Thread(target=loop.run_forever, name="reactor", daemon=True)
    reactor.start()
    sizes = [60 + (i * 7919) % 30000 for i in range(FRAMES)]
    sent_rx = [numbered(i, n) for i, n in enumerate(sizes)]
    sent_tx = [numbered(i, 60 + (i * 131) % 1454) for i in range(FRAMES)]
    got_tx: list[bytes] = []

    def host() -> None:
        # The host network: frames into the "tap" towards the guest, and what the guest sent out of it.
        for f, n in zip(sent_rx, sizes, strict=True):
            tap.host.setblocking(True)
            tap.host.send(rx_header(n).pack() + f)
        tap.host.settimeout(DEADLINE)
        while len(got_tx) < FRAMES:
            got_tx.append(tap.host.recv(1 << 17)[h.HDR_LEN :])

    host_thread = threading.Thread(target=host, name="host", daemon=True)
    host_thread.start()
    rx = LinuxLikeRx(rxq, notify.fds[RX])
    try:
        deadline = time.monotonic() + DEADLINE
        next_tx = 0
        while len(rx.frames) < FRAMES or len(got_tx) < FRAMES:
            assert time.monotonic() < deadline, f"rx {len(rx.frames)}/{FRAMES}, tx {len(got_tx)}/{FRAMES}"
            rx.refill()
            rx.poll()
            txq.get_used()  # asserts each id is in range and in flight
            while next_tx < FRAMES and txq.free:
                txq.add([h.NetHeader().pack() + sent_tx[next_tx]], [])
                next_tx += 1
                os.eventfd_write(notify.fds[TX], 1)
            time.sleep(0)
        host_thread.join(DEADLINE)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        reactor.join(10)
        d.transport.close()
        tap.host.close()
    assert rx.frames == sent_rx
    assert got_tx == sent_tx
    assert dev.stats.rx_drops == 0 and dev.stats.tx_drops == 0


def test_the_partial_publish_check_can_fail(loop: asyncio.AbstractEventLoop) -> None:
    """The concurrent test's merged-frame check catches an index published part-way through a frame."""
    tap = FakeTap()
    try:
        dev = VirtioNet(tap, MAC, queue_size=256)
        d = MmioDriver(dev, loop=loop)
        d.bring_up(256)
        rx = LinuxLikeRx(d.queues[RX], os.eventfd(0))
        rx.refill()
        d.kick(RX)
        tap.host.send(rx_header(20000).pack() + numbered(1, 20000))
        loop.run_until_complete(asyncio.sleep(0.05))
        q = d.queues[RX]
        used = q.used_idx()
        assert used > 1
        q.mem.write_u16(q.used + 2, 1)  # as if only the first buffer had been published
        with pytest.raises(AssertionError, match="not published with its first"):
            rx.poll()
    finally:
        tap.host.close()
        tap.dev_end.close()
