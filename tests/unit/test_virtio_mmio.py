"""The virtio-mmio transport's register file and status machine, driven as Linux's virtio_mmio driver does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from evmm.devices.bus import Bus
from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.device import CONFIG_CHANGE, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG
from evmm.devices.virtio.rng import VirtioRng
from tests.fakes.virtio_driver import MmioDriver


def test_identity_registers(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    assert d.r(regs.MAGIC_VALUE) == 0x74726976
    assert d.r(regs.VERSION_REG) == 2
    assert d.r(regs.DEVICE_ID) == VIRTIO_ID_RNG
    assert d.r(regs.VENDOR_ID_REG) == 0x4D4D5645
    feats = d.device_features()
    assert feats & VIRTIO_F_VERSION_1 and feats & VIRTIO_F_EVENT_IDX
    d.w(regs.QUEUE_SEL, 0)
    assert d.r(regs.QUEUE_NUM_MAX) == 256
    d.w(regs.QUEUE_SEL, 1)
    assert d.r(regs.QUEUE_NUM_MAX) == 0  # no such queue


def test_bring_up_activates_and_reset_deactivates(loop: asyncio.AbstractEventLoop) -> None:
    dev = VirtioRng()
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    assert dev.activated
    assert d.r(regs.STATUS) & regs.DRIVER_OK
    d.w(regs.STATUS, 0)
    assert not dev.activated
    assert d.r(regs.STATUS) == 0


def test_features_without_version_1_are_refused(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER)
    d.w(regs.DRIVER_FEATURES_SEL, 1)
    d.w(regs.DRIVER_FEATURES, 0)  # legacy driver: no VERSION_1
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK)
    assert not d.r(regs.STATUS) & regs.FEATURES_OK


def test_features_the_device_does_not_offer_are_refused(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER)
    d.w(regs.DRIVER_FEATURES_SEL, 0)
    d.w(regs.DRIVER_FEATURES, 1 << 5)
    d.w(regs.DRIVER_FEATURES_SEL, 1)
    d.w(regs.DRIVER_FEATURES, 1)
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK)
    assert not d.r(regs.STATUS) & regs.FEATURES_OK


def test_bad_queue_config_sets_needs_reset_instead_of_crashing(loop: asyncio.AbstractEventLoop) -> None:
    errors: list[str] = []
    d = MmioDriver(VirtioRng(), loop=loop)
    d.transport._on_error = errors.append
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER)
    d.w(regs.DRIVER_FEATURES_SEL, 1)
    d.w(regs.DRIVER_FEATURES, 1)
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK)
    d.w(regs.QUEUE_SEL, 0)
    d.w(regs.QUEUE_NUM, 100)  # not a power of two
    d.w(regs.QUEUE_READY, 1)
    d.w(regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK | regs.DRIVER_OK)
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
    assert errors and "not a power of two" in errors[0]
    assert d.r(regs.INTERRUPT_STATUS) & regs.INT_CONFIG


def test_interrupt_status_and_ack(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    d.queues[0].add([], [16])
    d.kick(0)
    assert d.irq.count == 1
    assert d.ack_interrupt() == regs.INT_VRING
    assert d.r(regs.INTERRUPT_STATUS) == 0
    d.ctx.interrupt.trigger(CONFIG_CHANGE)
    assert d.r(regs.CONFIG_GENERATION) == 1
    assert d.r(regs.INTERRUPT_STATUS) == regs.INT_CONFIG
    assert d.irq.count == 2


def test_a_device_interrupt_sets_its_bit_and_triggers_the_irq_once_each(
    loop: asyncio.AbstractEventLoop,
) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    interrupt = d.ctx.interrupt
    interrupt.trigger(0)
    assert (d.r(regs.INTERRUPT_STATUS), d.irq.count, d.r(regs.CONFIG_GENERATION)) == (regs.INT_VRING, 1, 0)
    interrupt.trigger(CONFIG_CHANGE)
    assert d.r(regs.INTERRUPT_STATUS) == regs.INT_VRING | regs.INT_CONFIG
    assert (d.irq.count, d.r(regs.CONFIG_GENERATION)) == (2, 1)


def test_the_interrupt_of_a_reset_device_is_dead(loop: asyncio.AbstractEventLoop) -> None:
    # A completion that arrives after the driver reset the device (a worker thread finishing late) must not
    # interrupt the driver, nor mark the new incarnation of the device broken.
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    stale = d.ctx.interrupt
    d.w(regs.STATUS, 0)
    d.bring_up()
    before = d.irq.count
    stale.trigger(0)
    stale.trigger(CONFIG_CHANGE)
    stale.needs_reset("too late")
    assert d.irq.count == before
    assert d.r(regs.INTERRUPT_STATUS) == 0
    assert not d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET


def test_a_device_that_needs_a_reset_says_so_once(loop: asyncio.AbstractEventLoop) -> None:
    errors: list[str] = []
    d = MmioDriver(VirtioRng(), loop=loop)
    d.transport._on_error = errors.append
    d.bring_up()
    d.ctx.interrupt.needs_reset("the ring is broken")
    d.ctx.interrupt.needs_reset("and again")
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
    assert d.r(regs.INTERRUPT_STATUS) == regs.INT_CONFIG  # §2.1.2: with a config change notification
    assert d.irq.count == 1
    assert errors == ["virtio-rng at 0xd0000000: the ring is broken; the device needs a reset"]
    d.queues[0].add([], [16])
    d.kick(0)  # a device that needs a reset serves nothing
    assert d.queues[0].get_used() == []


def test_only_interrupt_status_and_ack_are_served_on_the_vcpu_thread(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    t = d.transport
    bus = Bus("mmio")
    bus.insert(0x1000, 0x200, t, "virtio-rng")
    hops: list[int] = []

    def on_reactor(fn: Callable[..., Any], *args: Any) -> Any:
        hops.append(args[0])  # the offset
        return fn(*args)

    d.ctx.interrupt.trigger(CONFIG_CHANGE)
    assert bus.read(0x1000 + regs.INTERRUPT_STATUS, 4, on_reactor) == regs.INT_CONFIG
    assert bus.read(0x1000 + regs.INTERRUPT_STATUS, 2, on_reactor) == 0  # §4.2.2.2: 32-bit only
    bus.write(0x1000 + regs.INTERRUPT_ACK, 2, regs.INT_CONFIG, on_reactor)  # ignored
    assert hops == []
    for offset in (regs.MAGIC_VALUE, regs.STATUS, regs.QUEUE_READY, regs.CONFIG_GENERATION):
        bus.read(0x1000 + offset, 4, on_reactor)
    assert hops == [regs.MAGIC_VALUE, regs.STATUS, regs.QUEUE_READY, regs.CONFIG_GENERATION]
    hops.clear()
    assert bus.read(0x1000 + regs.INTERRUPT_STATUS, 4, on_reactor) == regs.INT_CONFIG
    bus.write(0x1000 + regs.INTERRUPT_ACK, 4, regs.INT_CONFIG, on_reactor)
    assert bus.read(0x1000 + regs.INTERRUPT_STATUS, 4, on_reactor) == 0
    bus.write(0x1000 + regs.QUEUE_NOTIFY, 4, 0, on_reactor)
    assert hops == [regs.QUEUE_NOTIFY]


def test_narrow_and_unaligned_register_accesses_are_ignored(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    assert d.transport.read(regs.MAGIC_VALUE, 2) == 0
    assert d.transport.read(regs.MAGIC_VALUE + 1, 4) == 0
    d.transport.write(regs.STATUS, 1, 0xFF)
    assert d.r(regs.STATUS) == 0


def test_queue_registers_are_frozen_after_driver_ok(loop: asyncio.AbstractEventLoop) -> None:
    d = MmioDriver(VirtioRng(), loop=loop)
    d.bring_up()
    d.w(regs.QUEUE_SEL, 0)
    d.w(regs.QUEUE_NUM, 2)
    assert d.transport.queues[0].size == 256


def test_buffers_queued_before_driver_ok_are_served_at_activation(loop: asyncio.AbstractEventLoop) -> None:
    """Linux's virtio-rng posts a request and kicks while probing, before the driver sets DRIVER_OK."""
    d = MmioDriver(VirtioRng(), loop=loop)
    orig_write = d.w
    staged: list[int] = []

    def w(off: int, value: int) -> None:
        if off == regs.STATUS and value & regs.DRIVER_OK:
            staged.append(d.queues[0].add([], [32]))
            d.kick(0)  # ignored: not DRIVER_OK yet
            assert d.queues[0].get_used() == []
        orig_write(off, value)

    d.w = w  # type: ignore[method-assign]
    d.bring_up()
    used = d.queues[0].get_used()
    assert [u.head for u in used] == staged and used[0].length == 32


def test_describe_shows_both_sides_of_each_queue(loop: asyncio.AbstractEventLoop) -> None:
    """query-vm's view of a device: what someone debugging a stalled queue reads."""
    d = MmioDriver(VirtioRng(), loop=loop)
    assert d.transport.describe()["virtio"]["queues"] == [None]  # type: ignore[index]
    d.bring_up()
    d.queues[0].add([], [16])
    d.queues[0].add([], [16])
    before = d.transport.describe()["virtio"]
    q = before["queues"][0]  # type: ignore[index]
    assert (q["size"], q["avail_idx"], q["next_avail"], q["used_idx"]) == (256, 2, 0, 0)
    d.kick(0)
    after = d.transport.describe()["virtio"]
    q = after["queues"][0]  # type: ignore[index]
    assert (q["next_avail"], q["next_used"], q["used_idx"]) == (2, 2, 2)
    assert q["signalled_used"] == 2 and "used_event" in q  # EVENT_IDX was negotiated
    assert after["interrupt_status"] == regs.INT_VRING and after["device"] == "virtio-rng"  # type: ignore[index]
