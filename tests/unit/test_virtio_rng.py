"""virtio-rng fills buffers with random bytes, honours its rate limit, and survives hostile chains."""

from __future__ import annotations

import asyncio

from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX
from evmm.devices.virtio.rng import VirtioRng
from tests.fakes.virtio_driver import DirectDriver, MmioDriver


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


def test_the_device_needs_only_its_queue_and_its_interrupt(loop: asyncio.AbstractEventLoop) -> None:
    # No transport: what the device was given at activation is all it uses.
    d = DirectDriver(VirtioRng(), loop=loop)
    q = d.queues[0]
    q.add([], [32])
    q.add([], [32])
    d.kick(0)
    assert [u.length for u in q.get_used()] == [32, 32]
    assert d.interrupt.triggers == [0]  # one interrupt for the batch, for queue 0
    d.close()


def test_the_device_asks_its_queue_whether_the_driver_wants_an_interrupt(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # virtio 1.2 §2.7.10: with EVENT_IDX the driver says at which used index it wants the next interrupt; the
    # device decides with its queue, before it calls the interrupt (Firecracker's Queue::prepare_kick).
    d = DirectDriver(VirtioRng(), loop=loop)
    assert d.features & VIRTIO_F_EVENT_IDX
    q = d.queues[0]
    q.add([], [8])
    d.kick(0)
    assert d.interrupt.triggers == [0]  # the first completion is always signalled
    q.set_used_event(5)  # "not before the 6th"
    for _ in range(3):
        q.add([], [8])
        d.kick(0)
    assert d.interrupt.triggers == [0]
    q.add([], [8])
    q.add([], [8])
    d.kick(0)  # used index goes 4 -> 6, past used_event 5
    assert d.interrupt.triggers == [0, 0]
    d.close()


def test_without_event_idx_the_no_interrupt_flag_suppresses(loop: asyncio.AbstractEventLoop) -> None:
    d = DirectDriver(VirtioRng(), loop=loop, features=VirtioRng().features() & ~VIRTIO_F_EVENT_IDX)
    q = d.queues[0]
    q.set_no_interrupt(True)  # VRING_AVAIL_F_NO_INTERRUPT (§2.7.7)
    q.add([], [8])
    d.kick(0)
    assert [u.length for u in q.get_used()] == [8] and d.interrupt.triggers == []
    q.set_no_interrupt(False)
    q.add([], [8])
    d.kick(0)
    assert d.interrupt.triggers == [0]
    d.close()


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
