"""Fuzz targets: every parser a guest or a client feeds, each a function of one byte string.

A target turns its input into what the hostile side controls (descriptor tables and rings in guest memory,
register accesses, frames on a socket) and lets evmm handle it.  The rule it checks is evmm's: a hostile
input fails that request or that device (a ``BadRequest``, an error answer, ``QueueBroken``, a device that
needs a reset), never the VMM, so *any* exception escaping a device's register access or reactor callback,
or a parser other than its documented error, is a crash.

``TARGETS`` is the registry the short run (tests/unit/test_fuzz_targets.py), the long run (``-m long``) and
``python -m tests.fuzz`` share.  virtio-fs requests and the guest agent's framing get targets here when they
land: a function ``(data: bytes) -> None`` added to ``TARGETS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.chain import Descriptor, DescriptorChain, InvalidChain
from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.queue import QueueBroken, QueueConfig, Virtqueue
from evmm.memory import GuestMemory
from tests.fakes.virtio_driver import Allocator, DriverQueue, MmioDriver
from tests.fuzz.engine import Data, Target

MEM_SIZE = 1 << 20
_MEM = GuestMemory.anonymous([(0, MEM_SIZE)])  # parsers only read it; each input rewrites what it uses

# Guest-physical addresses a hostile descriptor likes: RAM's edges, just past it, and far away.
ADDRS = (0, 0x1000, MEM_SIZE - 16, MEM_SIZE - 1, MEM_SIZE, MEM_SIZE + 0x1000, 0xFFFFFFFF, 0xFFFFFFFFFFFFF000)
LENS = (0, 1, 16, 512, 4096, 0x10000, 0xFFFFFFFF)


def _addr(d: Data) -> int:
    return d.pick(ADDRS) + d.below(64) if d.u8() & 1 else d.u32() % MEM_SIZE


def _len(d: Data) -> int:
    return d.pick(LENS) if d.u8() & 1 else d.u16()


# ---- virtqueue chains ----------------------------------------------------------------------------------------


def virtqueue_chain(raw: bytes) -> None:
    """A descriptor table and avail ring the guest wrote (§2.7.5-§2.7.6): walking them yields chains that lie
    in guest RAM, an InvalidChain, or QueueBroken; nothing else."""
    d = Data(raw)
    size = d.pick((1, 2, 8, 16, 256))
    dq = DriverQueue(_MEM, 0x10000, size, Allocator())
    vq = Virtqueue(0, QueueConfig(size, dq.desc, dq.avail, dq.used, True), _MEM, event_idx=bool(d.u8() & 1))
    for i in range(min(size, 1 + d.below(16))):
        _MEM.write(dq.desc + 16 * i, struct.pack("<QIHH", _addr(d), _len(d), d.u16() & 7, d.u16() % 300))
    for i in range(min(size, 8)):
        _MEM.write_u16(dq.avail + 4 + 2 * i, d.u16() % 300)
    _MEM.write_u16(dq.avail + 2, d.u16() if d.u8() & 1 else d.below(8))
    if d.u8() & 1:  # an indirect table somewhere in RAM
        table = 0x40000
        for i in range(d.below(8)):
            _MEM.write(table + 16 * i, struct.pack("<QIHH", _addr(d), _len(d), d.u16() & 7, d.u16() % 20))
    try:
        for _ in range(16):
            chain = vq.pop(_MEM)
            if chain is None:
                break
            assert isinstance(chain, DescriptorChain | InvalidChain)
            if isinstance(chain, DescriptorChain):
                for desc in chain.descriptors:
                    assert desc.length == 0 or _MEM.contains(desc.addr, desc.length), desc
                vq.add_used(chain.head, 0)
    except QueueBroken:
        pass


# ---- virtio-blk requests -------------------------------------------------------------------------------------


def blk_request(raw: bytes) -> None:
    """Any chain gives a request within the disk or a status for the guest (§5.2.6)."""
    from evmm.devices.virtio.blk.request import BadRequest, BlockRequest, Limits, parse_request

    d = Data(raw)
    limits = Limits(
        capacity=d.u16(),
        seg_max=1 + d.below(8),
        size_max=d.pick((512, 4096, 1 << 20)),
        max_discard_sectors=d.u8(),
        max_discard_seg=1 + d.below(4),
        max_write_zeroes_sectors=d.u8(),
        max_write_zeroes_seg=1 + d.below(4),
        readonly=d.u8() < 32,
        discard=d.u8() > 16,
        write_zeroes=d.u8() > 16,
    )
    descs = []
    at = 0x1000
    for _ in range(1 + d.below(6)):
        length = d.pick((0, 1, 16, 17, 512, 513, 4096)) if d.u8() & 1 else d.u16() % 8192
        body = d.take(min(length, 64))
        _MEM.write(at, body)
        descs.append(Descriptor(at, length, bool(d.u8() & 1)))
        at += (length + 15) & ~15
        if at > MEM_SIZE - 0x10000:
            break
    out = parse_request(descs, _MEM, limits)
    assert isinstance(out, BlockRequest | BadRequest)
    if isinstance(out, BlockRequest):
        for rg in out.ranges:
            assert rg.sector + rg.num_sectors <= limits.capacity


# ---- virtio-net headers --------------------------------------------------------------------------------------


def net_header(raw: bytes) -> None:
    """A TX header with any fields is checked (§5.1.6.2) before it reaches the tap; the RX side too."""
    from evmm.devices.virtio.net import header as h

    d = Data(raw)
    hdr = h.NetHeader.parse(d.take(h.HDR_LEN))
    features = d.u64()
    frame_len = d.u16()
    if h.check_tx(hdr, frame_len, features) is None:
        h.tap_tx_header(hdr)
    if h.check_rx(hdr, frame_len, features, d.pick((None, 68, 1500, 65535))) is None:
        h.rx_header(hdr, features, 1 + d.below(16))


# ---- vsock packets -------------------------------------------------------------------------------------------


def vsock_header(raw: bytes) -> None:
    from evmm.devices.virtio.vsock.packet import check_tx, parse_header

    d = Data(raw)
    hdr = parse_header(d.take(d.pick((0, 43, 44, 64))))
    if hdr is not None:
        check_tx(hdr, d.u32(), d.pick((3, 4, 0xFFFFFFFF)))


# ---- control channel and QMP framings ------------------------------------------------------------------------


def control_frames(raw: bytes) -> None:
    """Bytes from a control client, in any chunking: messages, or ProtocolErrors answered to that client."""
    from evmm.rpc.protocol import Decoder, ProtocolError, parse_request

    d = Data(raw)
    dec = Decoder(max_frame=d.pick((64, 4096, 1 << 20)))
    while d.left:
        for item in dec.feed(d.take(1 + d.below(64))):
            if isinstance(item, ProtocolError):
                continue
            try:
                parse_request(item)
            except ProtocolError:
                pass


def qmp_frames(raw: bytes) -> None:
    """Bytes from a QMP client: JSON objects split out of the stream, or errors for the client."""
    from evmm.rpc.qmp_wire import JsonError, JsonSplitter

    d = Data(raw)
    splitter = JsonSplitter(max_size=d.pick((64, 4096)))
    while d.left:
        for item in splitter.feed(d.take(1 + d.below(64))):
            if isinstance(item, JsonError):
                continue
            try:
                json.loads(item)
            except ValueError:
                pass


# ---- register files: legacy devices and the ACPI block ------------------------------------------------------


class _Irq:
    def set_level(self, level: bool) -> None:
        pass

    def trigger(self) -> None:
        pass


def _registers(device: Any, d: Data, span: int) -> None:
    while d.left:
        op = d.u8()
        offset = d.below(span + 2)
        size = d.pick((1, 1, 1, 2, 4, 8))
        if op & 1:
            device.write(offset, size, d.u64() & ((1 << (8 * size)) - 1))
        else:
            value = device.read(offset, size)
            assert 0 <= value < 1 << (8 * size), (offset, size, value)


def serial_registers(raw: bytes) -> None:
    from evmm.devices.legacy.serial import Serial

    _registers(Serial(_Irq(), lambda data: None), Data(raw), 8)


def rtc_registers(raw: bytes) -> None:
    from evmm.devices.legacy.rtc import Rtc

    _registers(Rtc(_Irq(), now=lambda: 1_700_000_000.0), Data(raw), 2)


def i8042_registers(raw: bytes) -> None:
    from evmm.devices.legacy.i8042 import I8042

    kbd = I8042(_Irq(), on_reset=lambda: None)
    d = Data(raw)
    data_port, cmd_port = kbd.data_port, kbd.command_port
    while d.left:
        port = data_port if d.u8() & 1 else cmd_port
        _registers(port, Data(d.take(10)), 1)


def acpi_registers(raw: bytes) -> None:
    from evmm.devices.acpi_pm import AcpiPm

    pm = AcpiPm(_Irq(), on_poweroff=lambda: None, on_reset=lambda: None)
    d = Data(raw)
    if d.u8() & 1:
        pm.power_button()
    _registers(pm, d, 16)


# ---- virtio-mmio transports with their devices ---------------------------------------------------------------

_OFFSETS = tuple(v for k, v in vars(regs).items() if k.isupper() and isinstance(v, int) and v < 0x200)


class _Reactor:
    """One event loop and one guest RAM for every device input of this process (making them per input cost
    more than the input itself); each input starts from zeroed rings and data, and any error the loop saw
    during the input is raised at its end."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda lp, ctx: self.errors.append(ctx))
        self.mem = GuestMemory.anonymous([(0, 4 << 20)])


_reactor: _Reactor | None = None


@contextmanager
def _loop() -> Iterator[asyncio.AbstractEventLoop]:
    global _reactor
    if _reactor is None:
        _reactor = _Reactor()
    r = _reactor
    r.errors.clear()
    r.mem.fill(0, 2 << 20)  # where the driver puts rings and buffers
    yield r.loop
    if r.errors:
        exc = r.errors[0].get("exception")
        raise exc if isinstance(exc, BaseException) else AssertionError(r.errors[0].get("message"))


def _spin(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0))
    loop.run_until_complete(asyncio.sleep(0))


def _drive(device: VirtioDevice, raw: bytes, loop: asyncio.AbstractEventLoop) -> None:
    """Register accesses, a proper bring-up or not, garbage in the rings, kicks: whatever the bytes say."""
    d = Data(raw)
    assert _reactor is not None
    drv = MmioDriver(device, loop=loop, mem=_reactor.mem)
    t = drv.transport
    try:
        if d.u8() & 1:
            drv.bring_up(d.pick((1, 2, 16, 256)), event_idx=bool(d.u8() & 1))
        while d.left:
            op = d.below(8)
            if op == 0:
                size = d.pick((1, 2, 4, 4, 4, 8))
                off = d.pick(_OFFSETS) if d.u8() & 3 else d.below(0x400)
                t.write(off, size, d.u64() & ((1 << (8 * size)) - 1))
            elif op == 1:
                size = d.pick((1, 2, 4, 4, 8))
                off = d.pick(_OFFSETS) if d.u8() & 3 else d.below(0x400)
                t.read(off, size)
            elif op in (2, 3) and drv.queues:  # garbage descriptors or ring fields
                q = drv.queues[d.below(len(drv.queues))]
                where = q.desc + d.below(16 * q.size) if op == 2 else q.avail + d.below(4 + 2 * q.size)
                drv.mem.write(where, d.take(1 + d.below(16)))
            elif op == 4 and drv.queues:  # a well-formed chain of odd sizes
                q = drv.queues[d.below(len(drv.queues))]
                readable = [d.take(d.below(64))] if d.u8() & 1 else []
                writable = [d.below(5000)] if d.u8() & 1 or not readable else []
                if len(q.free) >= len(readable) + len(writable):
                    q.add(readable, writable)
            elif op == 5:
                t.write(regs.QUEUE_NOTIFY, 4, d.below(4))
                _spin(loop)
            elif op == 6:
                t.write(regs.INTERRUPT_ACK, 4, t.read(regs.INTERRUPT_STATUS, 4))
            else:
                _spin(loop)
        _spin(loop)
    finally:
        t.write(regs.STATUS, 4, 0)  # reset: the device lets go of the rings
        _spin(loop)


def mmio_rng(raw: bytes) -> None:
    from evmm.devices.virtio.rng import VirtioRng

    with _loop() as loop:
        _drive(VirtioRng(), raw, loop)


_IMAGE = Path(tempfile.gettempdir()) / f"evmm-fuzz-{os.getpid()}.img"


def mmio_blk(raw: bytes) -> None:
    from evmm.devices.virtio.blk.backend import FileBackend
    from evmm.devices.virtio.blk.device import VirtioBlk

    if not _IMAGE.exists():
        with open(_IMAGE, "wb") as f:
            f.truncate(1 << 20)
    dev = VirtioBlk(FileBackend.open(_IMAGE, readonly=raw[:1] == b"\x00"), io_threads=1)
    try:
        with _loop() as loop:
            _drive(dev, raw[1:], loop)
    finally:
        dev.backend.close()


def mmio_net(raw: bytes) -> None:
    from evmm.devices.virtio.net.device import VirtioNet
    from tests.unit.test_virtio_net import FakeTap

    tap = FakeTap()
    d = Data(raw)
    for _ in range(d.below(4)):  # frames from the host side, any bytes
        tap.host.send(d.take(1 + d.below(100)))
    dev = VirtioNet(tap, b"\x52\x54\x00\x12\x34\x56", mtu=d.pick((None, 1500)))
    try:
        with _loop() as loop:
            _drive(dev, d.rest(), loop)
    finally:
        tap.close()
        tap.host.close()


def mmio_console(raw: bytes) -> None:
    from evmm.devices.virtio.console import VirtioConsole
    from evmm.devices.virtio.console_backend import FdBackend

    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    out_r, out_w = os.pipe()
    os.set_blocking(out_w, False)
    try:
        os.write(w, raw[:32])
        with _loop() as loop:
            _drive(VirtioConsole(FdBackend(r, out_w)), raw[32:], loop)
    finally:
        for fd in (r, w, out_r, out_w):
            os.close(fd)


def mmio_vsock(raw: bytes) -> None:
    from evmm.devices.virtio.vsock.device import VirtioVsock
    from evmm.devices.virtio.vsock.muxer import VsockMuxer

    # A host side with nobody listening: guest connections are refused (RST), as on an idle host.
    muxer = VsockMuxer(3, Path(tempfile.gettempdir()) / f"evmm-fuzz-vsock-{os.getpid()}", None)
    with _loop() as loop:
        _drive(VirtioVsock(muxer), raw, loop)


TARGETS: dict[str, Target] = {
    "virtqueue_chain": virtqueue_chain,
    "blk_request": blk_request,
    "net_header": net_header,
    "vsock_header": vsock_header,
    "control_frames": control_frames,
    "qmp_frames": qmp_frames,
    "serial_registers": serial_registers,
    "rtc_registers": rtc_registers,
    "i8042_registers": i8042_registers,
    "acpi_registers": acpi_registers,
    "mmio_rng": mmio_rng,
    "mmio_blk": mmio_blk,
    "mmio_net": mmio_net,
    "mmio_console": mmio_console,
    "mmio_vsock": mmio_vsock,
}

# Inputs that reach past the first checks at once (a bring-up, a few register writes), so a short run starts
# from somewhere useful.
SEEDS: dict[str, tuple[bytes, ...]] = {name: (bytes(64), b"\x01" * 64, bytes(range(256))) for name in TARGETS}
