"""virtio-rng fills buffers with random bytes, honours its rate limit, and survives hostile chains."""

from __future__ import annotations

import asyncio

from evmm.devices.virtio.rng import VirtioRng
from tests.fakes.virtio_driver import MmioDriver


def test_fills_every_buffer(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    q = d.queues[0]
    heads = [q.add([], [64]), q.add([], [16, 16], indirect=True)]
    d.kick(0)
    used = q.get_used()
    assert [u.head for u in used] == heads
    assert [u.length for u in used] == [64, 32]
    assert used[0].data != b"\xee" * 64 and len(set(used[0].data)) > 8
    assert d.irq.count == 1  # both completions, one interrupt


def test_readable_only_chain_gets_zero_bytes(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    d.queues[0].add([b"not for the device to fill"], [])
    d.kick(0)
    assert [u.length for u in d.queues[0].get_used()] == [0]


def test_rate_limit_delays_but_serves(loop: asyncio.AbstractEventLoop) -> None:
    dev = VirtioRng(rate_limit=1000)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    q = d.queues[0]
    for _ in range(3):
        q.add([], [1000])
    d.kick(0)
    first = q.get_used()
    assert sum(u.length for u in first) <= 1000
    loop.run_until_complete(asyncio.sleep(0.6))
    later = q.get_used()
    assert sum(u.length for u in first + later) > sum(u.length for u in first)
    assert dev.bytes_served <= 1000 + 1000 * 0.7
