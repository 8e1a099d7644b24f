"""The virtio-mmio transport's and the virtio devices' state through their persist functions, with the
driver-side fake: a device restored into a new transport over a copy of guest RAM goes on with the same rings,
serves what the driver had posted, re-raises an unacknowledged interrupt, and gets back buffers the old
device held; one in flight refuses the snapshot."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from evmm.devices.virtio import console_persist, mmio_persist, rng_persist
from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.blk import persist as blk_persist
from evmm.devices.virtio.blk.backend import FileBackend
from evmm.devices.virtio.blk.device import VirtioBlk
from evmm.devices.virtio.console import RECEIVEQ, VirtioConsole
from evmm.devices.virtio.console_backend import FdBackend
from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net import persist as net_persist
from evmm.devices.virtio.net.device import RX, VirtioNet
from evmm.devices.virtio.rng import VirtioRng
from evmm.devices.virtio.vsock import persist as vsock_persist
from evmm.devices.virtio.vsock.device import EVENT_QUEUE, RX_QUEUE, VirtioVsock
from evmm.devices.virtio.vsock.muxer import VsockMuxer
from evmm.devices.virtio.vsock.unix import HybridListener, listen_unix
from evmm.machine.config import MachineConfig
from evmm.memory import GuestMemory
from evmm.snapshot.format import Fields, SnapshotError
from tests.fakes.virtio_driver import MEM_SIZE, DriverQueue, MmioDriver
from tests.unit.test_virtio_net import FakeTap

MAC = bytes.fromhex("525400123456")


def through_msgpack(state: dict[str, Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False)


def copy_memory(mem: GuestMemory) -> GuestMemory:
    new = GuestMemory.anonymous([(0, MEM_SIZE)])
    new.write(0, mem.read(0, MEM_SIZE))
    return new


def restore_into(
    old: MmioDriver, device: Any, state: dict[str, Any], loop: asyncio.AbstractEventLoop
) -> tuple[MmioDriver, Fields]:
    """A driver over a copy of ``old``'s RAM, whose transport takes ``state`` (as evmm/snapshot/devices.py)."""
    new = MmioDriver(device, loop=loop, mem=copy_memory(old.mem))
    new.queues = old.queues
    for q in new.queues:
        q.mem = new.mem
    f = mmio_persist.restore_registers(new.transport, through_msgpack(state), "snapshot D: slot 0")
    return new, f


def test_a_restored_rng_serves_what_the_driver_posted_and_reraises_its_interrupt(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rng = VirtioRng()
    old = MmioDriver(rng, loop=loop)
    old.bring_up(queue_size=8)
    q = old.queues[0]
    for _ in range(3):
        q.add([], [16])
    old.kick(0)
    assert len(q.get_used()) == 3 and old.irq.count == 1  # not acknowledged: pending at the snapshot
    for _ in range(2):
        q.add([], [32])  # posted, not kicked: the old device never saw them
    state = mmio_persist.save(old.transport, rng_persist.save(rng), "snapshot D", {})
    assert state["active"][0]["next_avail"] == 3 and state["interrupt_status"] == regs.INT_VRING

    dev = VirtioRng()
    new, f = restore_into(old, dev, state, loop)
    rng_persist.restore(dev, f.data["device"], "snapshot D: slot 0: device")
    mmio_persist.activate(new.transport, f)
    assert dev.activated
    assert new.irq.count >= 1  # the unacknowledged interrupt again
    used = q.get_used()
    assert [u.length for u in used] == [32, 32]  # only the two new buffers, in the same ring
    assert q.used_idx() == 5
    assert new.r(regs.STATUS) == old.r(regs.STATUS) and new.r(regs.INTERRUPT_STATUS) == regs.INT_VRING
    assert dev.bytes_served == 48 + 64


def test_a_snapshot_of_another_device_type_or_version_is_one_line(loop: asyncio.AbstractEventLoop) -> None:
    rng = VirtioRng()
    old = MmioDriver(rng, loop=loop)
    old.bring_up(queue_size=8)
    state = mmio_persist.save(old.transport, rng_persist.save(rng), "snapshot D", {})
    other = MmioDriver(VirtioNet(FakeTap(), MAC), loop=loop)
    with pytest.raises(
        SnapshotError, match=r"^snapshot D: slot 0: the snapshot has a device of type 4 with 1 queues"
    ):
        mmio_persist.restore_registers(other.transport, state, "snapshot D: slot 0")
    with pytest.raises(SnapshotError, match=r"state version 7; this evmm restores version 1"):
        mmio_persist.restore_registers(MmioDriver(VirtioRng(), loop=loop).transport, {**state, "v": 7}, "s")


def test_blk_requests_in_flight_are_waited_for_and_a_different_image_is_refused(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    blk = VirtioBlk(FileBackend.open(image, False), inline_reads=False)
    d = MmioDriver(blk, loop=loop)
    d.bring_up(queue_size=64)
    q = d.queues[0]
    import struct

    for sector in range(8):
        hdr = struct.pack("<IIQ", 0, 0, sector)  # VIRTIO_BLK_T_IN
        q.add([hdr], [4096, 1])
    d.kick(0)
    with pytest.raises(SnapshotError, match=r"queue 0 has \d+ requests in flight"):
        mmio_persist.save(d.transport, blk_persist.save(blk), "snapshot D", {})
    loop.run_until_complete(blk_persist.quiesce(blk, "snapshot D"))
    assert blk.in_flight == 0 and len(q.get_used()) == 8
    state = mmio_persist.save(d.transport, blk_persist.save(blk), "snapshot D", {})
    smaller = tmp_path / "small.img"
    smaller.write_bytes(bytes(4096))
    with pytest.raises(SnapshotError, match=r"small.img has 8 sectors; the guest's disk had 2048"):
        blk_persist.restore(VirtioBlk(FileBackend.open(smaller, False)), state["device"], "snapshot D")
    with pytest.raises(SnapshotError, match=r"must be attached writable, as the guest knew it"):
        blk_persist.restore(VirtioBlk(FileBackend.open(image, True)), state["device"], "snapshot D")
    blk.close()


def spin(loop: asyncio.AbstractEventLoop, seconds: float = 0.05) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


def receiving(
    device: Any, queue: int, size: int, loop: asyncio.AbstractEventLoop
) -> tuple[MmioDriver, DriverQueue]:
    """A driver that brought ``device`` up and posted one receive buffer of ``size`` bytes on ``queue``."""
    d = MmioDriver(device, loop=loop)
    d.bring_up(queue_size=16)
    rx = d.queues[queue]
    rx.add([], [size])
    d.kick(queue)
    return d, rx


def test_net_receive_buffers_held_for_a_frame_are_given_back_and_taken_again(
    loop: asyncio.AbstractEventLoop,
) -> None:
    tap = FakeTap()
    old, rx = receiving(VirtioNet(tap, MAC), RX, 1024, loop)
    tap.send(bytes(3000))  # needs three 1 KiB buffers: the device holds one
    spin(loop)
    net = old.transport.device
    assert isinstance(net, VirtioNet)
    held = net_persist.held(net)
    assert len(held[RX]) == 1 and rx.get_used() == []
    with pytest.raises(SnapshotError, match="requests in flight"):
        mmio_persist.save(old.transport, net_persist.save(net), "snapshot D", {})  # not named: refused
    state = mmio_persist.save(old.transport, net_persist.save(net), "snapshot D", held)
    assert state["active"][RX]["next_avail"] == 0  # given back

    tap2 = FakeTap()
    dev = VirtioNet(tap2, bytes.fromhex("525400abcdef"))  # a clone's MAC
    new, f = restore_into(old, dev, state, loop)
    net_persist.restore(dev, f.data["device"], "snapshot D: device")
    mmio_persist.activate(new.transport, f)
    tap2.send(b"after the restore")
    spin(loop)
    (used,) = rx.get_used()
    assert used.data[h.HDR_LEN :] == b"after the restore"  # delivered into the buffer the old device held
    assert new.config(0, 6) == int.from_bytes(bytes.fromhex("525400abcdef"), "little")
    tap.close()
    tap2.close()


def test_vsock_sends_transport_reset_after_a_restore(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    def make(path: Path) -> VirtioVsock:
        sock = listen_unix(path, "--vsock", port_suffix=True)
        return VirtioVsock(VsockMuxer(3, path, HybridListener(sock, path)))

    old = MmioDriver(make(tmp_path / "a.sock"), loop=loop)
    old.bring_up(queue_size=8)
    event = old.queues[EVENT_QUEUE]
    event.add([], [8])
    old.kick(EVENT_QUEUE)
    assert event.get_used() == []  # no event yet
    device = old.transport.device
    state = mmio_persist.save(old.transport, vsock_persist.save(device), "snapshot D", {})  # type: ignore[arg-type]

    dev = make(tmp_path / "b.sock")
    new, f = restore_into(old, dev, state, loop)
    vsock_persist.restore(dev, f.data["device"], "snapshot D: device")
    mmio_persist.activate(new.transport, f)
    vsock_persist.after_restore(dev)
    (used,) = event.get_used()
    assert used.length == 4 and used.data == bytes(4)  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    device.close()
    dev.close()


# ---- freeze: nothing a device does on host input reaches guest RAM while memory is written -----------------


def test_a_frozen_nic_leaves_a_tap_frame_on_the_tap_until_thawed(loop: asyncio.AbstractEventLoop) -> None:
    tap = FakeTap()
    d, rx = receiving(VirtioNet(tap, MAC), RX, 2048, loop)
    thaw = net_persist.freeze(d.transport.device)  # type: ignore[arg-type]
    tap.send(b"during the save")
    spin(loop)
    assert rx.get_used() == [] and tap.queued_for_device() is not None
    thaw()
    spin(loop)
    (used,) = rx.get_used()
    assert used.data[h.HDR_LEN :] == b"during the save"
    tap.close()


def test_a_frozen_console_leaves_input_with_the_host_until_thawed(loop: asyncio.AbstractEventLoop) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.set_blocking(in_r, False)
    console = VirtioConsole(FdBackend(in_r, out_w))
    _, rx = receiving(console, RECEIVEQ, 64, loop)
    thaw = console_persist.freeze(console)
    os.write(in_w, b"typed meanwhile")
    spin(loop)
    assert rx.get_used() == []
    thaw()
    spin(loop)
    (used,) = rx.get_used()
    assert used.data == b"typed meanwhile"
    console.close()
    for fd in (in_w, out_r):
        os.close(fd)


def test_a_frozen_vsock_holds_a_host_connection_request_until_thawed(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    path = tmp_path / "v.sock"
    sock = listen_unix(path, "--vsock", port_suffix=True)
    dev = VirtioVsock(VsockMuxer(3, path, HybridListener(sock, path)))
    _, rx = receiving(dev, RX_QUEUE, 256, loop)
    thaw = vsock_persist.freeze(dev)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(b"CONNECT 1234\n")
        spin(loop)
        assert rx.get_used() == []
        thaw()
        spin(loop)
        (used,) = rx.get_used()
        assert used.length >= 44  # struct virtio_vsock_hdr: the guest's REQUEST for port 1234
    dev.close()


def test_a_standard_board_machine_is_refused_in_one_line() -> None:
    from types import SimpleNamespace

    from evmm.snapshot.devices import check

    machine = SimpleNamespace(config=MachineConfig(kernel=Path("/dev/null"), board="standard"))
    with pytest.raises(SnapshotError) as e:
        check(machine, "snapshot /s")  # type: ignore[arg-type]
    assert (
        str(e.value) == "snapshot /s: only the microvm board can be snapshotted (this is --machine standard)"
    )
