"""A guest's vsock stack in miniature, on top of the driver-side queue fake, for testing the vsock device.

It behaves as Linux's virtio_transport does where tests can tell: RX buffers are a 44-byte header buffer
plus a 4 KiB data buffer (Linux 6.1's layout; ``split_header=False`` posts one buffer instead), it answers
REQUESTs on listening ports, keeps credit both ways, sends CREDIT_UPDATE when its application has read enough
(below 64 KiB of free space as the peer knows it), and records every credit violation it sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.vsock.packet import (
    HDR_SIZE,
    HOST_CID,
    SHUTDOWN_BOTH,
    TYPE_STREAM,
    U32,
    Header,
    Op,
    parse_header,
)
from tests.fakes.virtio_driver import MmioDriver

RX, TX, EVENT = 0, 1, 2
MAX_PKT = 64 * 1024


@dataclass
class GuestConn:
    local_port: int  # the guest's
    peer_port: int  # the host's
    buf_alloc: int
    state: str = "connecting"  # connecting, established, reset
    rx: bytearray = field(default_factory=bytearray)  # received, not yet read by the application
    data: bytearray = field(default_factory=bytearray)  # everything the application has read
    rx_cnt: int = 0
    fwd_cnt: int = 0
    fwd_told: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    tx_pending: bytearray = field(default_factory=bytearray)
    peer_shutdown: int = 0
    shutdown_after_tx: int = 0

    @property
    def credit(self) -> int:
        return max(self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32), 0)


class GuestVsock:
    def __init__(
        self,
        device: VirtioDevice,
        loop: asyncio.AbstractEventLoop,
        *,
        cid: int = 3,
        rx_buffers: int = 64,
        split_header: bool = True,
        buf_alloc: int = 256 * 1024,
        queue_size: int = 256,
    ) -> None:
        self.loop = loop
        self.cid = cid
        self.d = MmioDriver(device, loop=loop)
        self.d.bring_up(queue_size)
        self.split = split_header
        self.buf_alloc = buf_alloc
        self.conns: dict[tuple[int, int], GuestConn] = {}
        self.listening: set[int] = set()
        self.accepted: list[GuestConn] = []
        self.received: list[Header] = []  # every packet the device sent, in order
        self.violations: list[str] = []
        self.events: list[bytes] = []
        self._next_port = 50000
        self.rx_posted = 0
        for _ in range(rx_buffers):
            self.post_rx()
        self.d.kick(RX)

    # ---- raw queues -------------------------------------------------------------------------------------------

    def post_rx(self) -> None:
        q = self.d.queues[RX]
        q.add([], [HDR_SIZE, 4096] if self.split else [HDR_SIZE + 4096])
        self.rx_posted += 1

    def post_event(self) -> None:
        self.d.queues[EVENT].add([], [4])
        self.d.kick(EVENT)

    def send_raw(self, buffers: list[bytes]) -> None:
        self.d.queues[TX].get_used()  # reclaim descriptors
        self.d.queues[TX].add(buffers, [])
        self.d.kick(TX)

    def send(self, hdr: Header, payload: bytes = b"") -> None:
        self.send_raw([hdr.pack(), payload] if payload else [hdr.pack()])

    def header(self, c: GuestConn, op: Op, n: int = 0, flags: int = 0) -> Header:
        c.fwd_told = c.fwd_cnt
        return Header(
            self.cid, HOST_CID, c.local_port, c.peer_port, n, TYPE_STREAM, op, flags, c.buf_alloc, c.fwd_cnt
        )

    # ---- socket-like API --------------------------------------------------------------------------------------

    def listen(self, port: int) -> None:
        self.listening.add(port)

    def connect(self, host_port: int) -> GuestConn:
        self._next_port += 1
        c = GuestConn(self._next_port, host_port, self.buf_alloc)
        self.conns[(c.local_port, host_port)] = c
        self.send(self.header(c, Op.REQUEST))
        return c

    def write(self, c: GuestConn, data: bytes) -> None:
        c.tx_pending += data
        self._flush(c)

    def shutdown(self, c: GuestConn, flags: int = SHUTDOWN_BOTH) -> None:
        """Shut down once everything written so far has been sent."""
        c.shutdown_after_tx |= flags
        self._flush(c)

    def read(self, c: GuestConn) -> bytes:
        data = bytes(c.rx)
        c.rx.clear()
        c.data += data
        c.fwd_cnt = (c.fwd_cnt + len(data)) & U32
        free = c.buf_alloc - ((c.rx_cnt - c.fwd_told) & U32)
        if data and free < MAX_PKT and c.state == "established":
            self.send(self.header(c, Op.CREDIT_UPDATE))
        return data

    def _flush(self, c: GuestConn) -> None:
        while c.tx_pending and c.state == "established" and c.credit > 0:
            n = min(len(c.tx_pending), c.credit, MAX_PKT)
            chunk = bytes(c.tx_pending[:n])
            del c.tx_pending[:n]
            c.tx_cnt = (c.tx_cnt + n) & U32
            self.send(self.header(c, Op.RW, n), chunk)
        if not c.tx_pending and c.shutdown_after_tx and c.state == "established":
            flags, c.shutdown_after_tx = c.shutdown_after_tx, 0
            self.send(self.header(c, Op.SHUTDOWN, flags=flags))

    # ---- what the device sent ---------------------------------------------------------------------------------

    def poll(self) -> int:
        """Take every RX packet the device completed, re-post the buffers; returns the number taken."""
        used = self.d.queues[RX].get_used()
        for u in used:
            self.post_rx()
            hdr = parse_header(u.data)
            if hdr is None:
                self.violations.append(f"RX packet of {u.length} bytes has no header")
                continue
            if u.length != HDR_SIZE + hdr.len:
                self.violations.append(f"used length {u.length} but header len {hdr.len}")
            self.received.append(hdr)
            self._on_packet(hdr, u.data[HDR_SIZE:])
        if used:
            self.d.kick(RX)
        for u in self.d.queues[EVENT].get_used():
            self.events.append(u.data)
        return len(used)

    def _on_packet(self, h: Header, payload: bytes) -> None:
        if (h.src_cid, h.dst_cid, h.type) != (HOST_CID, self.cid, TYPE_STREAM):
            self.violations.append(f"bad addressing {h}")
            return
        key = (h.dst_port, h.src_port)
        c = self.conns.get(key)
        if c is None:
            if h.op == Op.REQUEST and h.dst_port in self.listening:
                c = GuestConn(h.dst_port, h.src_port, self.buf_alloc, state="established")
                c.peer_buf_alloc, c.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
                self.conns[key] = c
                self.accepted.append(c)
                self.send(self.header(c, Op.RESPONSE))
            elif h.op != Op.RST:
                self.send(Header(self.cid, HOST_CID, h.dst_port, h.src_port, 0, TYPE_STREAM, Op.RST))
            return
        c.peer_buf_alloc, c.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        if h.op == Op.RESPONSE and c.state == "connecting":
            c.state = "established"
        elif h.op == Op.RST:
            c.state = "reset"
            return
        elif h.op == Op.RW:
            if len(payload) != h.len:
                self.violations.append(f"RW len {h.len} with {len(payload)} bytes")
            c.rx += payload
            c.rx_cnt = (c.rx_cnt + len(payload)) & U32
            if (c.rx_cnt - c.fwd_cnt) & U32 > c.buf_alloc:
                self.violations.append(f"host sent beyond credit on {key}")
        elif h.op == Op.SHUTDOWN:
            c.peer_shutdown |= h.flags
        elif h.op == Op.CREDIT_REQUEST:
            self.send(self.header(c, Op.CREDIT_UPDATE))
        self._flush(c)

    # ---- running the reactor ----------------------------------------------------------------------------------

    def pump(self, until: Callable[[], bool], timeout: float = 10.0, *, read_all: bool = True) -> None:
        """Run the loop and the guest until ``until()`` holds; the guest's applications read eagerly."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("the vsock guest fake waited too long")
            self.loop.run_until_complete(asyncio.sleep(0.0005))
            self.poll()
            if read_all:
                for c in list(self.conns.values()):
                    if c.rx:
                        self.read(c)
