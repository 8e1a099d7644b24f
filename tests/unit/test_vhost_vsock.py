"""virtio-vsock on /dev/vhost-vsock, without the device: the ioctl sequence and values a recording fake sees
across open, DRIVER_OK, reset and close; kicks and interrupts through the transport's eventfds; error lines.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from evmm.config.devspec import VsockSpec, parse_vsock
from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from evmm.devices.virtio.vsock import VhostVsock, make_vsock
from evmm.devices.virtio.vsock.device import VIRTIO_VSOCK_F_STREAM
from evmm.errors import ConfigError
from evmm.memory import GuestMemory
from evmm.vhost.backend import MemTable, VhostError
from evmm.vhost.vsock import VhostVsockFd
from tests.fakes.vhost import VIRTIO_VSOCK_F_SEQPACKET, FakeNotifyRegistrar, FakeVhostVsock
from tests.fakes.virtio_driver import MEM_SIZE, MmioDriver

CID = 42
RX, TX, EVENT = 0, 1, 2


def vhost_device(fake: FakeVhostVsock, cid: int = CID) -> VhostVsock:
    dev = make_vsock(VsockSpec(cid=cid, vhost=True), open_vhost=lambda: fake)
    assert isinstance(dev, VhostVsock)
    return dev


def spin(loop: asyncio.AbstractEventLoop, until: Callable[[], bool] = lambda: False, n: int = 20) -> None:
    """Run the reactor a few rounds (eventfd readers fire), or until ``until()`` holds."""
    for _ in range(n):
        loop.run_until_complete(asyncio.sleep(0.001))
        if until():
            return


def counter(fd: int) -> int:
    """What an eventfd holds (0 when nobody signalled it since the last read); reading resets it."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def activation_calls(
    d: MmioDriver, features: int, kick: dict[int, int], call: dict[int, int]
) -> list[object]:
    calls: list[object] = [("set_features", features), ("set_mem_table", [(0, MEM_SIZE)])]
    for i in (RX, TX):
        q = d.queues[i]
        calls += [
            ("set_vring_num", i, q.size),
            ("set_vring_addr", i, q.desc, q.avail, q.used),
            ("set_vring_base", i, 0),
            ("set_vring_kick", i, kick[i]),
            ("set_vring_call", i, call[i]),
        ]
    return [*calls, ("set_running", True)]


def test_open_claims_the_cid_and_offers_the_intersection_of_features() -> None:
    fake = FakeVhostVsock()
    dev = vhost_device(fake)
    assert fake.calls == [("get_features",), ("set_guest_cid", CID)]
    # Ring features evmm implements and vsock's own; never ACCESS_PLATFORM, LOG_ALL, ANY_LAYOUT or
    # NOTIFY_ON_EMPTY, which the kernel offers too.  Linux 6.1's vhost has no F_STREAM bit: not offered.
    assert dev.features() == (
        VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_VSOCK_F_SEQPACKET
    )
    assert vhost_device(FakeVhostVsock(VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM)).features() == (
        VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM
    )
    assert dev.config() == CID.to_bytes(8, "little")


def test_driver_ok_programs_the_kernel_rings(loop: asyncio.AbstractEventLoop) -> None:
    fake = FakeVhostVsock()
    notify = FakeNotifyRegistrar()
    dev = vhost_device(fake)
    mark = len(fake.calls)
    # A driver that turns down INDIRECT_DESC and SEQPACKET: the kernel is told exactly what it accepted.
    d = MmioDriver(dev, loop=loop, notify=notify, features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    accepted = d.bring_up()
    assert accepted == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    call = {i: fd for i, fd in fake.call.items() if fd is not None}
    # The kick fds are the queues' ioeventfds themselves: KVM signals the kernel with no exit and no reactor.
    assert fake.since(mark) == activation_calls(d, accepted, {RX: notify.fds[RX], TX: notify.fds[TX]}, call)
    assert len({call[RX], call[TX], notify.fds[RX], notify.fds[TX]}) == 4
    assert fake.running and dev.activated


def test_kicks_of_rx_and_tx_reach_the_kernel_and_event_stays_in_evmm(loop: asyncio.AbstractEventLoop) -> None:
    fake = FakeVhostVsock()
    notify = FakeNotifyRegistrar()
    dev = vhost_device(fake)
    d = MmioDriver(dev, loop=loop, notify=notify)
    d.bring_up()
    spin(loop)
    for i in (RX, TX):
        counter(notify.fds[i])  # what the activation passed on
        os.eventfd_write(notify.fds[i], 1)  # the guest's QueueNotify write, as KVM signals it
    spin(loop)
    # The reactor no longer reads them: the count is there for the kernel to take.
    assert counter(notify.fds[RX]) == 1 and counter(notify.fds[TX]) == 1

    # The EVENT queue is evmm's: an event waits for a buffer, which arrives with a kick on its ioeventfd.
    irqs = d.irq.count
    dev.transport_reset()
    d.queues[EVENT].add([], [4])
    os.eventfd_write(notify.fds[EVENT], 1)
    spin(loop, lambda: d.queues[EVENT].used_idx() == 1)
    assert [u.data for u in d.queues[EVENT].get_used()] == [b"\0\0\0\0"]
    assert d.irq.count == irqs + 1 and d.r(regs.INTERRUPT_STATUS) & regs.INT_VRING


def test_trapped_queue_notify_writes_are_passed_on(loop: asyncio.AbstractEventLoop) -> None:
    # Without ioeventfds (every QueueNotify write exits), the transport hands out its own eventfds.
    fake = FakeVhostVsock()
    d = MmioDriver(vhost_device(fake), loop=loop)
    d.bring_up()
    kick_tx = fake.kick[TX]
    assert kick_tx is not None
    counter(kick_tx)
    d.kick(TX)
    d.kick(TX)
    assert counter(kick_tx) == 2


def test_every_call_is_an_interrupt_with_int_vring(loop: asyncio.AbstractEventLoop) -> None:
    fake = FakeVhostVsock()
    dev = vhost_device(fake)
    d = MmioDriver(dev, loop=loop, notify=FakeNotifyRegistrar())
    d.bring_up()
    spin(loop)
    d.ack_interrupt()
    # The driver asks for no interrupt until used index 100 (EVENT_IDX): evmm's own suppression would
    # stay quiet, but the kernel already judged that and wrote the call fd, so each write is an interrupt.
    d.queues[RX].set_used_event(100)
    call_rx = fake.call[RX]
    assert call_rx is not None
    for n in range(1, 4):
        os.eventfd_write(call_rx, 1)
        spin(loop, lambda: bool(d.r(regs.INTERRUPT_STATUS)))
        assert d.irq.count == n
        assert d.ack_interrupt() == regs.INT_VRING


def test_reset_stops_the_kernel_and_takes_the_eventfds_back(loop: asyncio.AbstractEventLoop) -> None:
    fake = FakeVhostVsock()
    notify = FakeNotifyRegistrar()
    dev = vhost_device(fake)
    d = MmioDriver(dev, loop=loop, notify=notify)
    d.bring_up()
    call_fds = [fd for fd in fake.call.values() if fd is not None]
    fake.bases = {RX: 7, TX: 9}  # how far the kernel got
    mark = len(fake.calls)
    d.w(regs.STATUS, 0)
    assert fake.since(mark) == [
        ("set_running", False),
        ("get_vring_base", RX),
        ("set_vring_kick", RX, None),
        ("set_vring_call", RX, None),
        ("get_vring_base", TX),
        ("set_vring_kick", TX, None),
        ("set_vring_call", TX, None),
    ]
    assert dev.vring_bases == {RX: 7, TX: 9} and not dev.activated and not fake.running
    assert not any(is_open(fd) for fd in call_fds)
    # The ioeventfds are the reactor's again: a stray kick is read (and dropped: the device is reset).
    os.eventfd_write(notify.fds[TX], 1)
    spin(loop)
    assert counter(notify.fds[TX]) == 0

    # The driver brings it up again from scratch (new rings, the kernel's bases from 0).
    d.queues.clear()
    fake.bases = {}
    mark = len(fake.calls)
    accepted = d.bring_up()
    call = {i: fd for i, fd in fake.call.items() if fd is not None}
    assert fake.since(mark) == activation_calls(d, accepted, {RX: notify.fds[RX], TX: notify.fds[TX]}, call)
    assert fake.running


def test_close_releases_every_fd(loop: asyncio.AbstractEventLoop) -> None:
    before = set(os.listdir("/proc/self/fd"))
    fake = FakeVhostVsock()
    notify = FakeNotifyRegistrar()
    d = MmioDriver(vhost_device(fake), loop=loop, notify=notify)
    d.bring_up()
    d.transport.close()
    assert fake.calls[-1] == ("close",) and ("set_running", False) in fake.calls
    assert sorted(notify.removed) == [RX, TX, EVENT]
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_refused_activation_needs_a_reset_not_a_crash(loop: asyncio.AbstractEventLoop) -> None:
    fake = FakeVhostVsock(fail={"set_running": errno.EFAULT})
    errors: list[str] = []
    d = MmioDriver(vhost_device(fake), loop=loop)
    d.transport._on_error = errors.append
    d.bring_up()
    assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
    assert errors == ["vhost-vsock at 0xd0000000: set_running failed: Bad address; the device needs a reset"]
    assert fake.calls[-3:] == [
        ("get_vring_base", TX),
        ("set_vring_kick", TX, None),
        ("set_vring_call", TX, None),
    ]
    d.w(regs.STATUS, 0)
    assert d.r(regs.STATUS) == 0


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file"), "/dev/vhost-vsock does not exist"),
        (OSError(errno.ENODEV, "No such device"), "/dev/vhost-vsock does not exist"),
        (PermissionError(errno.EACCES, "Permission denied"), "/dev/vhost-vsock: permission denied"),
        (PermissionError(errno.EPERM, "Operation not permitted"), "/dev/vhost-vsock: permission denied"),
    ],
)
def test_opening_vhost_fails_with_one_line(failure: OSError, expected: str) -> None:
    def refuse() -> FakeVhostVsock:
        raise failure

    with pytest.raises(ConfigError) as e:
        make_vsock(VsockSpec(cid=7, vhost=True), open_vhost=refuse)
    assert str(e.value).startswith("--vsock cid=7,vhost=on: ") and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_a_cid_in_use_is_named_and_the_device_closed() -> None:
    fake = FakeVhostVsock(fail={"set_guest_cid": errno.EADDRINUSE})
    with pytest.raises(ConfigError, match=r"^--vsock cid=42,vhost=on: CID 42 is already in use on this host"):
        vhost_device(fake)
    assert fake.closed


def test_the_real_opener_reports_a_missing_device_and_a_wrong_one(tmp_path: Path) -> None:
    missing = str(tmp_path / "vhost-vsock")
    with pytest.raises(ConfigError, match="does not exist"):
        make_vsock(VsockSpec(cid=3, vhost=True), open_vhost=lambda: VhostVsockFd.open(missing))
    before = set(os.listdir("/proc/self/fd"))
    # Not a vhost device: VHOST_SET_OWNER is refused, the line says so and the fd is closed again.
    with pytest.raises(ConfigError, match=r"^--vsock cid=3,vhost=on: VHOST_SET_OWNER failed: "):
        make_vsock(VsockSpec(cid=3, vhost=True), open_vhost=lambda: VhostVsockFd.open("/dev/null"))
    assert set(os.listdir("/proc/self/fd")) <= before


def test_path_and_vhost_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="path= and vhost=on exclude each other"):
        parse_vsock("cid=3,path=/tmp/v.sock,vhost=on")
    assert parse_vsock("cid=3,vhost=on") == VsockSpec(cid=3, path=None, vhost=True)
    with pytest.raises(ConfigError, match=r"path= is required \(or vhost=on\)"):
        parse_vsock("cid=3,vhost=off")


def test_mem_table_maps_guest_addresses_to_ours() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20), (4 << 30, 1 << 20)])
    table = MemTable(mem.regions)
    for r, e in zip(mem.regions, table.entries, strict=True):
        base = ctypes.addressof(ctypes.c_char.from_buffer(r.buffer))
        assert (e.gpa, e.size, e.user_addr) == (r.gpa, r.size, base)
    assert table.user_addr((4 << 30) + 0x100, 16) == table.entries[1].user_addr + 0x100
    for gpa, n in ((1 << 20, 4), ((1 << 20) - 8, 16), (2 << 30, 4)):
        with pytest.raises(VhostError) as refused:
            table.user_addr(gpa, n)
        assert refused.value.errno == errno.EINVAL
    table.release()
    mem.close()
    assert all(r.buffer.closed for r in mem.regions)


def test_every_wrapper_builds_its_argument_and_reports_a_refusal() -> None:
    # /dev/null answers every ioctl with ENOTTY: each call gets as far as the kernel and fails in one line.
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    fd = os.open("/dev/null", os.O_RDWR)
    v = VhostVsockFd(fd)
    with pytest.raises(VhostError, match="VHOST_SET_VRING_ADDR before VHOST_SET_MEM_TABLE"):
        v.set_vring_addr(0, 0x1000, 0x2000, 0x3000)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("VHOST_GET_FEATURES", v.get_features),
        ("VHOST_SET_FEATURES", lambda: v.set_features(VIRTIO_F_VERSION_1)),
        ("VHOST_SET_MEM_TABLE", lambda: v.set_mem_table(mem.regions)),
        ("VHOST_SET_VRING_NUM (queue 1)", lambda: v.set_vring_num(1, 256)),
        ("VHOST_SET_VRING_BASE (queue 1)", lambda: v.set_vring_base(1, 0)),
        ("VHOST_GET_VRING_BASE (queue 1)", lambda: v.get_vring_base(1)),
        ("VHOST_SET_VRING_KICK (queue 0)", lambda: v.set_vring_kick(0, fd)),
        ("VHOST_SET_VRING_CALL (queue 0)", lambda: v.set_vring_call(0, None)),
        ("VHOST_VSOCK_SET_GUEST_CID", lambda: v.set_guest_cid(3)),
        ("VHOST_VSOCK_SET_RUNNING", lambda: v.set_running(True)),
    ]
    for what, call in calls:
        with pytest.raises(VhostError) as refused:
            call()
        assert refused.value.errno == errno.ENOTTY
        assert str(refused.value) == f"{what} failed: {os.strerror(errno.ENOTTY)}"
    v.close()
    assert v.fd == -1 and not is_open(fd)
    mem.close()
    assert all(r.buffer.closed for r in mem.regions)  # a refused table holds no export of guest RAM
