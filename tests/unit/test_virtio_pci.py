"""The virtio-pci transport (virtio 1.2 §4.1) with a driver that works as Linux's virtio_pci_modern does:
identity and capabilities, bring-up, MSI-X per queue and for config changes, the INTx fallback with the ISR,
notifications as ioeventfds that follow the BAR, reset, and what a hostile driver writes."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from evmm.address_space import AddressSpace, Alias, Container
from evmm.devices.pci.config import COMMAND
from evmm.devices.virtio.device import COMMON_FEATURES, CONFIG_CHANGE, VIRTIO_ID_NET, VirtioDevice
from evmm.devices.virtio.rng import VirtioRng
from tests.fakes.address_space import RecordingListener
from tests.fakes.virtio_pci_driver import BAR_ADDRESS, PciDriver


class TwoQueues(VirtioDevice):
    """A network-class device with two queues and a config space it can change, for transport tests."""

    device_id = VIRTIO_ID_NET
    name = "two-queues"

    def __init__(self) -> None:
        super().__init__((64, 32))
        self.kicked: list[int] = []
        self.cfg = bytearray(b"\x01\x02\x03\x04\x05\x06")

    def features(self) -> int:
        return COMMON_FEATURES

    def config(self) -> bytes:
        return bytes(self.cfg)

    def queue_notify(self, index: int) -> None:
        self.kicked.append(index)
        ctx = self.ctx
        assert ctx is not None
        q = ctx.queue(index)
        while (chain := q.pop(ctx.mem)) is not None:
            q.add_used(chain.head, 0)
        ctx.signal_used(q)


def test_identity_capabilities_and_bar(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    fn = d.fn
    # §4.1.2.1: vendor 0x1AF4, device 0x1040 + the virtio ID, revision >= 1, subsystem ID >= 0x40.
    assert fn.config_read(0x00, 4) == (0x1040 + VIRTIO_ID_NET) << 16 | 0x1AF4
    assert fn.config_read(0x08, 1) >= 1 and fn.config_read(0x2E, 2) >= 0x40
    assert fn.config_read(0x09, 3) == 0x020000 and fn.config_read(0x3D, 1) == 1  # Ethernet, INTA#
    assert sorted(d.caps) == [1, 2, 3, 4, 5]  # common, notify, ISR, device, PCI config access
    for cfg_type, (cap, bar, offset, length) in d.caps.items():
        assert bar == 0 and fn.config_read(cap + 2, 1) == (20 if cfg_type in (2, 5) else 16)
        if cfg_type != 5:
            assert length > 0 and offset + length <= 0x8000
    assert d.caps[1][3] >= 0x38 and d.caps[3][3] >= 1
    assert struct.unpack_from("<I", fn.config.data, d.caps[2][0] + 16)[0] == 4  # notify_off_multiplier
    assert [cap_id for _, cap_id in fn.config.capabilities()].count(0x11) == 1
    assert fn.msix.vectors == 3  # two queues and config changes
    fn.config_write(COMMAND, 2, 0)
    fn.config_write(0x10, 4, 0xFFFF_FFFF)
    fn.config_write(0x14, 4, 0xFFFF_FFFF)
    assert (fn.config_read(0x10, 4), fn.config_read(0x14, 4)) == (0xFFFF_8004, 0xFFFF_FFFF)  # 32 KiB, 64-bit


def test_bring_up_with_msix_sends_each_queue_on_its_vector(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    assert d.status() == 0xF and d.fn.device.activated
    d.queues[1].add([b"x"], [])
    d.kick(1)
    assert d.fn.device.kicked == [1]  # type: ignore[attr-defined]
    assert [u.head for u in d.queues[1].get_used()] == [0]
    assert d.msi.take() == [("route", 2, 0xFEE0_0000, 0x42), ("fire", 2)]
    assert not d.intx.level and d.isr() == 0  # MSI-X: no INTx, the queue bit is not set


def test_a_config_change_goes_to_the_config_vector_sets_the_isr_bit_and_moves_the_generation(
    loop: asyncio.AbstractEventLoop,
) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    generation = d.common_read(0x15, 1)
    d.ctx.interrupt.trigger(CONFIG_CHANGE)
    assert d.msi.fired() == [0]
    assert d.common_read(0x15, 1) == (generation + 1) & 0xFF
    assert d.isr() == 2 and d.isr() == 0  # read once


def test_without_msix_interrupts_are_intx_and_the_isr_says_why(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(VirtioRng(), loop=loop)
    d.bring_up(msix=False)
    d.queues[0].add([], [16])
    d.kick(0)
    assert len(d.queues[0].get_used()[0].data) == 16
    assert d.intx.level and d.fn.config_read(0x06, 2) & 0x08  # Interrupt Status in the PCI status register
    assert d.isr() == 1
    assert not d.intx.level and d.isr() == 0
    assert d.msi.take() == []


def test_a_vector_the_device_does_not_have_reads_back_as_no_vector(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.common_write(0x16, 2, 0)
    d.common_write(0x1A, 2, 3)  # vectors 0-2 exist
    assert d.common_read(0x1A, 2) == 0xFFFF
    d.common_write(0x10, 2, 7)
    assert d.common_read(0x10, 2) == 0xFFFF


def test_a_masked_vector_holds_the_interrupt_until_the_driver_unmasks_it(
    loop: asyncio.AbstractEventLoop,
) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    table = d.fn.config_read(d.msix_cap() + 4, 4) & ~7
    d.fn.region.device.write(table + 16 * 1 + 12, 4, 1)  # mask queue 0's vector
    d.queues[0].add([b"x"], [])
    d.kick(0)
    assert d.msi.take() == [] and d.fn.msix.pending(1)
    pba = d.fn.config_read(d.msix_cap() + 8, 4) & ~7
    assert d.fn.region.device.read(pba, 8) == 1 << 1
    d.fn.region.device.write(table + 16 * 1 + 12, 4, 0)
    assert d.msi.fired() == [1]


def test_notifications_are_ioeventfds_that_move_with_the_bar(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    assert [(e.offset, e.length, e.datamatch) for e in d.fn.region.ioeventfds] == [
        (0x3000, 2, None),
        (0x3004, 2, None),
    ]
    space = AddressSpace("memory", Container("system", 1 << 64))
    pci = Container("pci-mem", 1 << 64)
    space.root.add(Alias("hole", pci, 0xC000_0000, 0x1000_0000), 0xC000_0000)
    rec = RecordingListener()
    space.add_listener(rec)
    d.fn.detach()
    d.fn.attach(pci, Container("pci-io", 1 << 16))
    fds = [e.fd for e in d.fn.region.ioeventfds]
    assert [c for c in rec.take() if c[0] == "fd+"] == [
        ("fd+", BAR_ADDRESS + 0x3000, 2, "two-queues-bar0", fds[0]),
        ("fd+", BAR_ADDRESS + 0x3004, 2, "two-queues-bar0", fds[1]),
    ]
    d.fn.config_write(0x10, 4, 0xC010_0000 | 4)
    assert [c[:2] for c in rec.take() if c[0].startswith("fd")] == [
        ("fd-", BAR_ADDRESS + 0x3000),
        ("fd-", BAR_ADDRESS + 0x3004),
        ("fd+", 0xC010_3000),
        ("fd+", 0xC010_3004),
    ]


def test_a_kick_through_the_ioeventfd_reaches_the_device(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    d.queues[0].add([b"x"], [])
    os.eventfd_write(d.fn.region.ioeventfds[0].fd, 1)  # what KVM does on the guest's write
    loop.run_until_complete(asyncio.sleep(0.05))
    assert d.fn.device.kicked == [0]  # type: ignore[attr-defined]
    assert d.msi.fired() == [1]


def test_a_backend_notifier_interrupts_through_the_queue_vector(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    fd = d.ctx.interrupt.notifier(1)
    os.eventfd_write(fd, 1)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert d.msi.fired() == [2]


def test_reset_forgets_vectors_and_restores_queue_sizes(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up(queue_size=16)
    d.common_write(0x14, 1, 0)
    assert d.common_read(0x14, 1) == 0 and not d.fn.device.activated
    d.common_write(0x16, 2, 1)
    assert (d.common_read(0x18, 2), d.common_read(0x1A, 2), d.common_read(0x1C, 2)) == (32, 0xFFFF, 0)
    assert d.common_read(0x10, 2) == 0xFFFF
    d.bring_up()  # and it comes up again
    assert d.fn.device.activated


def test_the_pci_config_access_capability_reaches_the_bar(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    cap = d.caps[5][0]
    d.fn.config_write(cap + 4, 1, 0)  # bar 0
    d.fn.config_write(cap + 8, 4, 0x2000 + 2)  # the device config, offset 2
    d.fn.config_write(cap + 12, 4, 2)  # two bytes
    assert d.fn.config_read(cap + 16, 4) == 0x0403
    d.fn.config_write(cap + 8, 4, 0x16)  # queue_select
    d.fn.config_write(cap + 16, 4, 1)
    assert d.common_read(0x16, 2) == 1
    d.fn.config_write(cap + 12, 4, 3)  # a length the capability does not allow: nothing happens
    d.fn.config_write(cap + 16, 4, 0)
    assert d.common_read(0x16, 2) == 1


# --- a hostile driver ---


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0x14, 2), (0x16, 1), (0x1A, 4), (0x20, 2), (0x23, 4), (0x10, 1), (0x37, 1)],
)
def test_common_config_accesses_of_the_wrong_width_do_nothing(
    loop: asyncio.AbstractEventLoop, offset: int, size: int
) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    before = [d.common_read(o, s) for o, s in ((0x14, 1), (0x16, 2), (0x1A, 2), (0x20, 8), (0x10, 2))]
    d.common_write(offset, size, (1 << (8 * size)) - 1)
    assert [d.common_read(o, s) for o, s in ((0x14, 1), (0x16, 2), (0x1A, 2), (0x20, 8), (0x10, 2))] == before


def test_queue_fields_of_a_queue_that_does_not_exist_read_zero_and_ignore_writes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.common_write(0x16, 2, 9)
    assert d.common_read(0x18, 2) == 0  # queue_size 0: no such queue (§4.1.4.3)
    d.common_write(0x1C, 2, 1)
    d.common_write(0x20, 8, 0x1000)
    assert d.common_read(0x1C, 2) == 0 and d.common_read(0x20, 8) == 0


def test_queue_configuration_is_frozen_after_driver_ok(loop: asyncio.AbstractEventLoop) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    d.common_write(0x16, 2, 0)
    desc = d.common_read(0x20, 8)
    d.common_write(0x20, 4, 0x5000)
    d.common_write(0x18, 2, 2)
    assert d.common_read(0x20, 8) == desc and d.common_read(0x18, 2) == 64


def test_a_queue_size_that_is_not_a_power_of_two_makes_the_device_need_a_reset(
    loop: asyncio.AbstractEventLoop,
) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.fn.core._on_error = None
    d.common_write(0x14, 1, 1 | 2)
    d.common_write(0x08, 4, 1)
    d.common_write(0x0C, 4, 1)  # VERSION_1
    d.common_write(0x14, 1, 1 | 2 | 8)
    d.common_write(0x16, 2, 0)
    d.common_write(0x18, 2, 48)
    d.common_write(0x1C, 2, 1)
    d.common_write(0x14, 1, 1 | 2 | 8 | 4)
    assert d.status() & 0x40 and not d.fn.device.activated  # DEVICE_NEEDS_RESET


def test_bar_accesses_outside_every_structure_read_zero_and_change_nothing(
    loop: asyncio.AbstractEventLoop,
) -> None:
    d = PciDriver(TwoQueues(), loop=loop)
    d.bring_up()
    bar = d.fn.region.device
    for offset in (0x38, 0x1001, 0x3008, 0x3002, 0x4030, 0x6008, 0x7FFF):
        bar.write(offset, 4, 0xFFFF_FFFF)
        assert bar.read(offset, 1) == 0
    assert d.fn.device.kicked == []  # type: ignore[attr-defined]
    assert d.status() == 0xF
