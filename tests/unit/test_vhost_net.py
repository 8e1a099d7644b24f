"""virtio-net on /dev/vhost-net, without the kernel: the features and config evmm offers, the ioctl sequence
a recording fake sees across DRIVER_OK, VQ_PAIRS_SET, taking the rings back, hot-replace, reset and close,
the control queue's answers, and the choice between vhost and evmm's own data path.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from collections.abc import Callable

import pytest

from evmm.config.devspec import NetSpec, parse_hotplug, parse_net
from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from evmm.devices.virtio.net import ctrl, open_vhost_net
from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.device import OFFLOAD_FEATURES
from evmm.devices.virtio.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN
from evmm.devices.virtio.net.vhost import VHOST_RING_FEATURES, VIRTIO_NET_F_MQ, VhostNet
from evmm.errors import ConfigError
from evmm.machine.hotplug import HotplugSlot
from tests.fakes.irq import EventfdInterrupt
from tests.fakes.vhost import (
    NET_KERNEL_FEATURES,
    VHOST_FEATURES,
    FakeNotifyRegistrar,
    FakeTap,
    FakeVhostNet,
)
from tests.fakes.virtio_driver import MEM_SIZE, DriverQueue, MmioDriver

MAC = bytes.fromhex("525400123456")
RX, TX = 0, 1


def nic(
    pairs: int = 1, features: int = NET_KERNEL_FEATURES, fail: dict[str, int] | None = None
) -> tuple[VhostNet, list[FakeVhostNet], FakeTap]:
    fakes = [FakeVhostNet(features, fail) for _ in range(pairs)]
    tap = FakeTap(pairs)
    return VhostNet(tap, MAC, fakes, mtu=1500), fakes, tap


def spin(loop: asyncio.AbstractEventLoop, until: Callable[[], bool] = lambda: False, n: int = 20) -> None:
    for _ in range(n):
        loop.run_until_complete(asyncio.sleep(0.001))
        if until():
            return


def ring_calls(d: MmioDriver, queue: int, ring: int, kick: int, call: int) -> list[object]:
    q = d.queues[queue]
    return [
        ("set_vring_num", ring, q.size),
        ("set_vring_addr", ring, q.desc, q.avail, q.used),
        ("set_vring_base", ring, 0),
        ("set_vring_kick", ring, kick),
        ("set_vring_call", ring, call),
    ]


def command(d: MmioDriver, queue: DriverQueue, index: int, body: bytes, ack_room: int = 1) -> list[bytes]:
    """Post one control command, kick, and return what came back (the ack bytes of each used chain)."""
    queue.add([body], [ack_room] if ack_room else [])
    d.kick(index)
    return [u.data for u in queue.get_used()]


def pairs_set(n: int) -> bytes:
    return bytes((ctrl.VIRTIO_NET_CTRL_MQ, ctrl.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET)) + struct.pack("<H", n)


def test_features_are_evmms_model_less_what_the_kernel_cannot_do() -> None:
    dev, fakes, _ = nic()
    assert fakes[0].calls == [("get_features",)]
    offered = dev.features()
    # The device model's features (offloads, MAC, status, MTU) and the ring features vhost-net implements.
    assert offered & OFFLOAD_FEATURES == OFFLOAD_FEATURES
    for bit in (h.VIRTIO_NET_F_MAC, h.VIRTIO_NET_F_STATUS, h.VIRTIO_NET_F_MTU, h.VIRTIO_NET_F_MRG_RXBUF):
        assert offered & bit
    assert offered & VHOST_RING_FEATURES == VHOST_RING_FEATURES
    assert not offered & (VIRTIO_NET_F_MQ | h.VIRTIO_NET_F_CTRL_VQ)  # one pair: no control queue
    assert dev.queue_sizes == (256, 256)
    # A kernel without EVENT_IDX or merged buffers: the driver is not offered them.
    old, _, _ = nic(features=VHOST_FEATURES & ~VIRTIO_F_EVENT_IDX)
    assert not old.features() & (VIRTIO_F_EVENT_IDX | h.VIRTIO_NET_F_MRG_RXBUF)
    assert old.features() & VIRTIO_F_INDIRECT_DESC
    # §5.1.4: mac, status (link up), max_virtqueue_pairs, mtu.
    assert dev.config() == MAC + struct.pack("<HHH", 1, 1, 1500)


def test_several_pairs_offer_mq_and_a_control_queue() -> None:
    dev, _, _ = nic(3)
    assert dev.features() & VIRTIO_NET_F_MQ and dev.features() & h.VIRTIO_NET_F_CTRL_VQ
    assert dev.queue_sizes == (256,) * 6 + (64,)
    assert dev.config()[8:10] == struct.pack("<H", 3)
    with pytest.raises(ValueError, match="3 queue pairs need a tap with 3 queues"):
        VhostNet(FakeTap(1), MAC, [FakeVhostNet() for _ in range(3)])


def test_driver_ok_programs_the_rings_then_attaches_the_tap(loop: asyncio.AbstractEventLoop) -> None:
    dev, (fake,), tap = nic()
    notify = FakeNotifyRegistrar()
    d = MmioDriver(dev, loop=loop, notify=notify)
    accepted = d.bring_up()
    call = {i: fd for i, fd in fake.call.items() if fd is not None}
    # The kernel is told only the ring features; the kick fds are the queues' ioeventfds themselves.
    assert fake.since(1) == [
        ("set_features", accepted & VHOST_RING_FEATURES),
        ("set_mem_table", [(0, MEM_SIZE)]),
        *ring_calls(d, RX, 0, notify.fds[RX], call[0]),
        *ring_calls(d, TX, 1, notify.fds[TX], call[1]),
        ("set_backend", 0, tap.queues[0]),
        ("set_backend", 1, tap.queues[0]),
    ]
    assert accepted & VIRTIO_F_VERSION_1 and accepted & h.VIRTIO_NET_F_MRG_RXBUF
    # The tap takes what the driver can receive, as for evmm's own data path.
    assert tap.offloads == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    assert tap.calls == []  # a single-queue tap is never told to attach or detach a queue


def test_every_call_of_the_kernel_is_an_interrupt(loop: asyncio.AbstractEventLoop) -> None:
    dev, (fake,), _ = nic()
    d = MmioDriver(dev, loop=loop, notify=FakeNotifyRegistrar())
    d.bring_up()
    spin(loop)
    d.ack_interrupt()
    call_rx = fake.call[RX]
    assert call_rx is not None
    os.eventfd_write(call_rx, 1)  # what vhost-net does when it used RX buffers and the driver wants to know
    spin(loop, lambda: bool(d.r(regs.INTERRUPT_STATUS)))
    assert d.ack_interrupt() == regs.INT_VRING


def test_with_an_irqfd_the_kernel_interrupts_the_guest_itself(loop: asyncio.AbstractEventLoop) -> None:
    dev, (fake,), _ = nic()
    d = MmioDriver(dev, loop=loop, notify=FakeNotifyRegistrar())
    irq = EventfdInterrupt()
    d.transport._irq = irq  # what the board gives a transport: KVM's irqfd
    try:
        assert d.r(regs.INTERRUPT_STATUS) == 0
        d.bring_up()
        # The kernel is given the irqfd as its call fd: no reactor wake between vhost and the guest.
        assert fake.call == {RX: irq.fd, TX: irq.fd}
        spin(loop)
        irq.pending()
        # Linux's vm_interrupt acts on INT_VRING only, and no one sets it for the kernel: it is reported.
        assert d.r(regs.INTERRUPT_STATUS) == regs.INT_VRING
        d.w(regs.INTERRUPT_ACK, regs.INT_VRING)
        assert d.r(regs.INTERRUPT_STATUS) == regs.INT_VRING
        dev.replace_tap(FakeTap())  # a config change of its own: both bits
        assert d.r(regs.INTERRUPT_STATUS) == regs.INT_VRING | regs.INT_CONFIG and irq.pending() == 1
        d.w(regs.STATUS, 0)
        assert fake.call == {RX: None, TX: None} and d.r(regs.INTERRUPT_STATUS) == 0
        os.fstat(irq.fd)  # still the transport's, open
    finally:
        d.transport.close()
        irq.close()


def test_the_driver_starts_on_one_pair_and_asks_for_more(loop: asyncio.AbstractEventLoop) -> None:
    dev, fakes, tap = nic(2)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    # §5.1.6.5.5: only receiveq1 until VQ_PAIRS_SET.  Pair 2 has its rings but no tap queue behind them, and
    # its tap queue is out of the kernel's spread.
    assert fakes[0].backend == {0: tap.queues[0], 1: tap.queues[0]}
    assert (
        fakes[1].backend == {0: None, 1: None} and ("set_vring_kick", 0, fakes[1].kick[0]) in fakes[1].calls
    )
    assert tap.attached == [True, False]
    assert dev.debug_state()["pairs_in_use"] == 1

    cq = d.queues[4]
    irqs = d.irq.count
    assert command(d, cq, 4, pairs_set(2)) == [bytes((ctrl.VIRTIO_NET_OK,))]
    assert d.irq.count == irqs + 1
    # Attached to the tap before vhost is given the queue (vhost cannot use a detached one).
    assert tap.calls[-1] == ("attach", 1) and fakes[1].calls[-2:] == [
        ("set_backend", 0, tap.queues[1]),
        ("set_backend", 1, tap.queues[1]),
    ]
    assert dev.debug_state()["pairs_in_use"] == 2

    # Back to one: vhost lets go first, then the tap queue leaves the spread.
    assert command(d, cq, 4, pairs_set(1)) == [bytes((ctrl.VIRTIO_NET_OK,))]
    assert fakes[1].backend == {0: None, 1: None} and tap.attached == [True, False]


@pytest.mark.parametrize(
    "body",
    [
        pairs_set(0),  # §5.1.6.5.5: 1 to max_virtqueue_pairs
        pairs_set(3),
        pairs_set(2)[:3],  # a short command
        bytes((0, 0, 1)),  # VIRTIO_NET_CTRL_RX PROMISC: not offered
        b"\x04",  # not even a command
    ],
)
def test_commands_evmm_does_not_carry_out_are_refused(loop: asyncio.AbstractEventLoop, body: bytes) -> None:
    dev, fakes, tap = nic(2)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    mark = len(fakes[1].calls)
    assert command(d, d.queues[4], 4, body) == [bytes((ctrl.VIRTIO_NET_ERR,))]
    assert fakes[1].since(mark) == [] and tap.attached == [True, False]


def test_a_command_with_nowhere_to_put_the_ack_is_returned_empty(loop: asyncio.AbstractEventLoop) -> None:
    dev, _, _ = nic(2)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    cq = d.queues[4]
    cq.add([pairs_set(2)], [])
    d.kick(4)
    assert [(u.length, u.data) for u in cq.get_used()] == [(0, b"")]
    assert dev.debug_state()["pairs_in_use"] == 1
    assert not d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET


def test_taking_the_rings_back_and_handing_them_over_again(loop: asyncio.AbstractEventLoop) -> None:
    dev, fakes, tap = nic(2)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    command(d, d.queues[4], 4, pairs_set(2))
    for f, (rx, tx) in zip(fakes, ((5, 7), (11, 13)), strict=True):
        f.bases = {0: rx, 1: tx}  # how far the kernel got
    marks = [len(f.calls) for f in fakes]
    assert dev.take_rings() == {0: 5, 1: 7, 2: 11, 3: 13}
    # The tap first (vhost flushes the ring as it lets go), then where the kernel stopped, then the eventfds.
    assert fakes[0].since(marks[0]) == [
        ("set_backend", 0, None),
        ("set_backend", 1, None),
        ("get_vring_base", 0),
        ("set_vring_kick", 0, None),
        ("set_vring_call", 0, None),
        ("get_vring_base", 1),
        ("set_vring_kick", 1, None),
        ("set_vring_call", 1, None),
    ]
    assert all(f.backend == {0: None, 1: None} for f in fakes)
    assert tap.attached == [True, False]

    dev.give_rings(d.ctx)
    for f, (rx, tx) in zip(fakes, ((5, 7), (11, 13)), strict=True):
        sets = [c for c in f.calls if c[0] == "set_vring_base"]
        assert sets[-2:] == [("set_vring_base", 0, rx), ("set_vring_base", 1, tx)]
        assert f.kick[0] is not None and f.call[1] is not None
    # The driver had asked for two pairs: both are served again.
    assert fakes[1].backend == {0: tap.queues[1], 1: tap.queues[1]} and tap.attached == [True, True]


def test_reset_takes_the_rings_back_and_close_releases_every_fd(loop: asyncio.AbstractEventLoop) -> None:
    before = set(os.listdir("/proc/self/fd"))
    dev, (fake,), tap = nic()
    notify = FakeNotifyRegistrar()
    d = MmioDriver(dev, loop=loop, notify=notify)
    d.bring_up()
    fake.bases = {0: 3, 1: 4}
    d.w(regs.STATUS, 0)
    assert fake.backend == {0: None, 1: None} and dev.vring_bases == {0: 3, 1: 4}
    assert fake.kick == {0: None, 1: None} and not dev.activated
    assert tap.offloads == 0
    # Brought up again from scratch: the kernel is programmed again and the tap reattached.
    d.queues.clear()
    d.bring_up()
    assert fake.backend == {0: tap.queues[0], 1: tap.queues[0]}
    d.transport.close()
    assert fake.closed and tap.queues == []
    assert sorted(notify.removed) == [RX, TX]
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_refused_activation_needs_a_reset_not_a_crash(loop: asyncio.AbstractEventLoop) -> None:
    dev, (fake,), _ = nic(fail={"set_mem_table": errno.ENOMEM})
    errors: list[str] = []
    d = MmioDriver(dev, loop=loop)
    d.transport._on_error = errors.append
    d.bring_up()
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
    assert errors == [
        "vhost-net at 0xd0000000: set_mem_table failed: Cannot allocate memory; the device needs a reset"
    ]
    assert fake.backend == {0: None, 1: None}
    d.w(regs.STATUS, 0)
    assert d.r(regs.STATUS) == 0


def test_hot_replace_moves_the_kernel_from_tap_to_tap(loop: asyncio.AbstractEventLoop) -> None:
    fake = FakeVhostNet()
    dev = VhostNet.empty(MAC, fake)
    d = MmioDriver(dev, loop=loop)
    d.bring_up()
    assert not dev.link_up and d.config(6, 2) == 0  # VIRTIO_NET_S_LINK_UP clear
    assert fake.backend == {0: None, 1: None}  # rings set up, nothing behind them
    d.ack_interrupt()

    first = FakeTap()
    dev.replace_tap(first)
    assert fake.backend == {0: first.queues[0], 1: first.queues[0]}
    assert first.offloads == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    assert d.config(6, 2) == 1 and d.ack_interrupt() == regs.INT_CONFIG

    second = FakeTap()
    fd = first.queues[0]
    dev.replace_tap(second)
    # The kernel let go of the old tap before it was closed.
    i = fake.calls.index(("set_backend", 1, None), fake.calls.index(("set_backend", 0, fd)))
    assert fake.calls[i + 1 :] == [("set_backend", 0, second.queues[0]), ("set_backend", 1, second.queues[0])]
    assert first.queues == [] and d.ack_interrupt() == regs.INT_CONFIG

    dev.replace_tap(None)
    assert fake.backend == {0: None, 1: None} and second.queues == [] and d.config(6, 2) == 0


def test_a_slot_keeps_the_data_path_it_was_booted_with() -> None:
    slot = HotplugSlot("hp-net0", "net", VhostNet.empty(MAC, FakeVhostNet()))
    with pytest.raises(ConfigError, match=r"^slot hp-net0: its vhost=on is fixed at boot"):
        slot.fill(NetSpec(tap="evx0", vhost=False))


def test_vhost_is_used_where_it_opens_and_asked_for_it_must() -> None:
    def refuse(code: int) -> Callable[[], FakeVhostNet]:
        def opener() -> FakeVhostNet:
            raise OSError(code, os.strerror(code))

        return opener

    assert open_vhost_net("--net tap=t0", False, 2, FakeVhostNet) == []
    assert len(open_vhost_net("--net tap=t0", None, 2, FakeVhostNet)) == 2
    assert open_vhost_net("--net tap=t0", None, 2, refuse(errno.ENOENT)) == []  # evmm's own path
    with pytest.raises(ConfigError) as e:
        open_vhost_net("--net tap=t0", True, 1, refuse(errno.ENOENT))
    assert str(e.value) == (
        "--net tap=t0: /dev/vhost-net does not exist: this host's kernel has no vhost-net "
        "(modprobe vhost_net), or vhost=off for evmm's own data path"
    )
    with pytest.raises(ConfigError, match=r"^--net tap=t0: /dev/vhost-net: permission denied"):
        open_vhost_net("--net tap=t0", True, 1, refuse(errno.EACCES))
    # Out of fds after the first pair: fewer pairs, not no vhost.
    opened: list[FakeVhostNet] = []

    def one_then_none() -> FakeVhostNet:
        if opened:
            raise OSError(errno.EMFILE, "Too many open files")
        opened.append(FakeVhostNet())
        return opened[0]

    assert open_vhost_net("--net tap=t0", True, 4, one_then_none) == opened


def test_the_options_say_vhost() -> None:
    assert parse_net("tap=t0").vhost is None
    assert parse_net("tap=t0,vhost=on").vhost is True
    assert parse_net("tap=t0,vhost=off").vhost is False
    with pytest.raises(ConfigError, match="--net: vhost='maybe' is not on/off"):
        parse_net("tap=t0,vhost=maybe")
    assert parse_hotplug("net=1") == (0, 1, None)
    assert parse_hotplug("net=2,vhost=off") == (0, 2, False)


def test_a_snapshot_refuses_a_vhost_net_nic_and_names_the_way_round() -> None:
    from evmm.snapshot.devices import virtio_persist
    from evmm.snapshot.format import SnapshotError

    dev, _, _ = nic()
    with pytest.raises(SnapshotError, match=r"vhost-net device cannot be snapshotted: .*vhost=off"):
        virtio_persist(dev)
