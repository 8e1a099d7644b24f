"""virtio-vsock through the driver-side fake, with real Unix sockets on the host side (hybrid vsock)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.config.devspec import VsockSpec
from evmm.devices.virtio.chain import VIRTQ_DESC_F_NEXT
from evmm.devices.virtio.device import VIRTIO_F_VERSION_1
from evmm.devices.virtio.vsock import VirtioVsock, make_vsock
from evmm.devices.virtio.vsock.connection import BUF_ALLOC
from evmm.devices.virtio.vsock.device import VIRTIO_VSOCK_F_STREAM
from evmm.devices.virtio.vsock.muxer import FIRST_LOCAL_PORT
from evmm.devices.virtio.vsock.packet import HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM, Header, Op
from evmm.errors import ConfigError
from tests.fakes.vsock_guest import GuestConn, GuestVsock

CID = 3
_opened: list[socket.socket] = []  # host-side test sockets, closed after each test


def track(s: socket.socket) -> socket.socket:
    _opened.append(s)
    return s


@pytest.fixture(autouse=True)
def _close_test_sockets() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def dev(sock_path: Path) -> Iterator[VirtioVsock]:
    d = make_vsock(VsockSpec(cid=CID, path=sock_path))
    assert isinstance(d, VirtioVsock)
    yield d
    d.reset()
    d.close()


def guest_of(dev: VirtioVsock, loop: asyncio.AbstractEventLoop, **kw: int | bool) -> GuestVsock:
    return GuestVsock(dev, loop, cid=CID, **kw)  # type: ignore[arg-type]


def host_connect(path: Path, port: int) -> socket.socket:
    s = track(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    s.connect(str(path))
    s.sendall(f"CONNECT {port}\n".encode())
    return s


def read_line(s: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            break
        line += b
    return line


def host_listener(path: Path, port: int) -> socket.socket:
    s = track(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    s.bind(f"{path}_{port}")
    s.listen(16)
    return s


def recv_all(s: socket.socket, out: bytearray) -> None:
    """Read until EOF; a reset (closed with our bytes unread) counts as the end too."""
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass


def accept_host_conn(g: GuestVsock, path: Path, port: int) -> tuple[GuestConn, socket.socket]:
    """A host->guest connection, established: the guest side and the host client (after its OK line)."""
    g.listen(port)
    s = host_connect(path, port)
    n = len(g.accepted)
    g.pump(lambda: len(g.accepted) > n)
    s.settimeout(5)
    line = read_line(s)
    assert line.startswith(b"OK ")
    return g.accepted[-1], s


def test_config_space_and_features(dev: VirtioVsock, loop: asyncio.AbstractEventLoop) -> None:
    g = guest_of(dev, loop)
    assert g.d.config(0, 4) | (g.d.config(4, 4) << 32) == CID
    assert g.d.device_features() & (VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM) == (
        VIRTIO_F_VERSION_1 | VIRTIO_VSOCK_F_STREAM
    )


def test_host_to_guest_connect_handshake(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)
    req = next(h for h in g.received if h.op == Op.REQUEST)
    assert (req.src_cid, req.dst_cid, req.dst_port, req.type) == (HOST_CID, CID, 52, TYPE_STREAM)
    assert req.src_port >= FIRST_LOCAL_PORT and req.buf_alloc == BUF_ALLOC
    assert c.peer_port == req.src_port
    # Data written right after the CONNECT line reaches the guest after the handshake, intact.
    s.sendall(b"hello guest")
    g.pump(lambda: bytes(c.data) == b"hello guest")
    g.write(c, b"hello host")
    assert s.recv(100) == b"hello host"
    s.close()


def test_host_connect_to_a_port_nobody_listens_on(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    s = host_connect(sock_path, 99)
    s.settimeout(5)
    got = bytearray()
    t = threading.Thread(target=recv_all, args=(s, got))
    t.start()
    g.pump(lambda: not t.is_alive())  # the guest's RST closes the client
    assert got == b""
    assert dev.muxer.connections == 0


def test_bad_connect_lines_are_closed(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    for line in (b"HELLO\n", b"CONNECT x\n", b"A" * 100):
        s = track(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        s.connect(str(sock_path))
        s.sendall(line)
        s.settimeout(5)
        got = bytearray()
        t = threading.Thread(target=recv_all, args=(s, got))
        t.start()
        g.pump(lambda t=t: not t.is_alive())  # type: ignore[misc]
        assert got == b""
        s.close()
    assert not any(h.op == Op.REQUEST for h in g.received)


def test_guest_to_host_connect(dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path) -> None:
    g = guest_of(dev, loop)
    lst = host_listener(sock_path, 1234)
    c = g.connect(1234)
    g.pump(lambda: c.state == "established")
    s = track(lst.accept()[0])
    resp = next(h for h in g.received if h.op == Op.RESPONSE)
    assert (resp.src_port, resp.dst_port, resp.buf_alloc) == (1234, c.local_port, BUF_ALLOC)
    g.write(c, b"ping")
    assert s.recv(10) == b"ping"
    s.sendall(b"pong")
    g.pump(lambda: bytes(c.data) == b"pong")
    s.close()
    lst.close()


def test_guest_connect_to_nobody_gets_rst(dev: VirtioVsock, loop: asyncio.AbstractEventLoop) -> None:
    g = guest_of(dev, loop)
    c = g.connect(4321)
    g.pump(lambda: c.state == "reset")
    assert dev.muxer.connections == 0


@pytest.mark.parametrize("split", [True, False], ids=["hdr+buf", "one-buffer"])
def test_bulk_both_ways_intact_within_credit(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path, split: bool
) -> None:
    # A small guest receive buffer makes the host side stop and wait for credit many times over.
    g = guest_of(dev, loop, split_header=split, buf_alloc=32 * 1024)
    c, s = accept_host_conn(g, sock_path, 52)
    down = os.urandom(2 << 20)
    up = os.urandom(2 << 20)
    t = threading.Thread(target=s.sendall, args=(down,))
    t.start()
    g.pump(lambda: len(c.data) == len(down), timeout=60)
    t.join()
    assert hashlib.sha256(c.data).digest() == hashlib.sha256(down).digest()
    assert g.violations == []

    # Up: the host reads slowly, so the device holds what the socket cannot take, within its credit.
    got = bytearray()

    def slow_reader() -> None:
        while len(got) < len(up):
            got.extend(s.recv(1 << 16))
            time.sleep(0.002)

    r = threading.Thread(target=slow_reader)
    r.start()
    g.write(c, up)
    peak = 0
    entry = dev.muxer._conns[(c.peer_port, c.local_port)]

    def done() -> bool:
        nonlocal peak
        peak = max(peak, len(entry.conn.to_host))
        return not r.is_alive()

    g.pump(done, timeout=60, read_all=False)
    assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
    assert peak <= BUF_ALLOC
    assert g.violations == []
    s.close()


def test_host_half_close_then_guest_close(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    g.pump(lambda: c.peer_shutdown == SHUTDOWN_SEND)
    assert bytes(c.data) == b"last words"
    # Half-closed: the guest may still talk to the host.
    g.write(c, b"reply")
    assert s.recv(10) == b"reply"
    g.shutdown(c, SHUTDOWN_BOTH)
    g.pump(lambda: c.state == "reset")  # the closing RST (§5.10.6.5)
    assert s.recv(10) == b""  # and the host sees EOF
    assert dev.muxer.connections == 0


def test_host_full_close_is_shutdown_then_rst(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)
    s.sendall(b"bye")
    s.close()
    g.pump(lambda: c.state == "reset")
    assert bytes(c.data) == b"bye"
    ops = [h.op for h in g.received if h.dst_port == c.local_port]
    assert ops[-2:] == [Op.SHUTDOWN, Op.RST]
    assert dev.muxer.connections == 0


def test_guest_half_close(dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path) -> None:
    g = guest_of(dev, loop)
    lst = host_listener(sock_path, 7)
    c = g.connect(7)
    g.pump(lambda: c.state == "established")
    s = track(lst.accept()[0])
    g.write(c, b"request")
    g.shutdown(c, SHUTDOWN_SEND)
    s.settimeout(5)
    got = bytearray()
    recv_all(s, got)  # EOF once the guest's data is through: shutdown(SHUT_WR) on the host socket
    assert got == b"request"
    s.sendall(b"response")
    s.close()
    g.pump(lambda: c.state == "reset")
    assert bytes(c.data) == b"response"
    lst.close()


def test_guest_rst_closes_the_host_socket(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)
    g.send(g.header(c, Op.RST))
    g.pump(lambda: dev.muxer.connections == 0)
    s.settimeout(5)
    assert s.recv(10) == b""


def test_eight_concurrent_connections(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop, rx_buffers=32)
    lst = host_listener(sock_path, 9000)
    size = 256 * 1024
    pairs: list[tuple[GuestConn, socket.socket]] = []
    for i in range(4):
        pairs.append(accept_host_conn(g, sock_path, 100 + i))
    for _ in range(4):
        c = g.connect(9000)
        g.pump(lambda c=c: c.state == "established")  # type: ignore[misc]
        pairs.append((c, track(lst.accept()[0])))
    payloads = [os.urandom(size) for _ in pairs]
    results = [bytearray() for _ in pairs]
    threads = []
    for (c, s), data, out in zip(pairs, payloads, results, strict=True):
        s.settimeout(30)
        threads.append(threading.Thread(target=s.sendall, args=(data,)))

        def reader(s: socket.socket = s, out: bytearray = out) -> None:
            while len(out) < size:
                out += s.recv(1 << 16)

        threads.append(threading.Thread(target=reader))
        g.write(c, data[::-1])
    for t in threads:
        t.start()
    g.pump(lambda: all(len(c.data) == size for c, _ in pairs) and not any(t.is_alive() for t in threads), 60)
    for (c, _), data, out in zip(pairs, payloads, results, strict=True):
        assert bytes(c.data) == data
        assert bytes(out) == data[::-1]
    assert g.violations == []
    assert dev.muxer.connections == 8
    for _, s in pairs:
        s.close()
    lst.close()


def test_rx_starvation_holds_host_data_until_buffers_come(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop, rx_buffers=4)
    c, s = accept_host_conn(g, sock_path, 52)
    g.pump(lambda: g.rx_posted >= 5)  # let the handshake's buffers be replaced
    # Stop re-posting RX buffers: the guest stops reading its queue.
    g.post_rx = lambda: None  # type: ignore[method-assign]
    data = os.urandom(200_000)
    s.setblocking(False)
    s.send(data)
    for _ in range(200):
        loop.run_until_complete(asyncio.sleep(0.0005))
    taken = sum(h.len for h in g.received if h.op == Op.RW)
    g.poll()
    assert taken <= 4 * 4096  # four buffers at most; the rest stays in the host socket
    del g.post_rx  # buffers again
    for _ in range(8):
        g.post_rx()
    g.d.kick(0)
    g.pump(lambda: len(c.data) == len(data))
    assert bytes(c.data) == data


def test_hostile_packets_fail_only_themselves(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)
    before = len(g.received)

    def hdr(op: int = Op.RW, n: int = 0, **kw: int) -> Header:
        fields: dict[str, int] = {
            "src_cid": CID,
            "dst_cid": HOST_CID,
            "src_port": 7,
            "dst_port": 8,
            "len": n,
            "type": 1,
            "op": op,
        }
        fields.update(kw)
        return Header(**fields)

    g.send(hdr(Op.REQUEST, src_cid=99))  # spoofed source: dropped silently
    g.send_raw([b"\x01" * 20])  # truncated header: dropped
    g.send(hdr(Op.REQUEST, dst_cid=77))  # not the host: RST
    g.send(hdr(op=42))  # unknown op: RST
    g.send(hdr(Op.REQUEST, type=2))  # SEQPACKET was not offered: RST
    g.send(hdr(Op.RW, 5000), b"x" * 10)  # len beyond the buffer: RST
    g.send(hdr(Op.CREDIT_UPDATE))  # for no connection: RST
    # A chain pointing outside guest RAM (the queue fake's raw descriptors) fails that chain only.
    q = g.d.queues[1]
    q.get_used()
    slot = q.free.pop()
    q.mem.write(q.desc + 16 * slot, struct.pack("<QIHH", 1 << 40, 44, 0, 0))
    q.publish(slot)
    g.d.kick(1)
    g.pump(lambda: len(g.received) >= before + 5)
    rsts = [h for h in g.received[before:] if h.op == Op.RST]
    assert len(rsts) == 5 and all(h.dst_port == 7 and h.src_port == 8 for h in rsts)
    assert dev.muxer.dropped >= 7
    # The established connection did not notice.
    g.write(c, b"still fine")
    s.settimeout(5)
    assert s.recv(100) == b"still fine"
    s.sendall(b"yes")
    g.pump(lambda: bytes(c.data) == b"yes")


def test_len_beyond_buffer_on_a_connection_resets_only_it(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c1, s1 = accept_host_conn(g, sock_path, 52)
    c2, s2 = accept_host_conn(g, sock_path, 53)
    g.send(g.header(c1, Op.RW, 1000), b"short")
    g.pump(lambda: c1.state == "reset")
    s1.settimeout(5)
    assert s1.recv(10) == b""
    g.write(c2, b"unaffected")
    s2.settimeout(5)
    assert s2.recv(100) == b"unaffected"


def test_guest_overrunning_credit_is_reset(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)  # the host client never reads
    chunk = b"z" * 65536
    for _ in range(BUF_ALLOC // len(chunk) + 64):
        if c.state != "established":
            break
        c.tx_cnt = 0  # a broken guest that ignores the credit it was given
        g.send(g.header(c, Op.RW, len(chunk)), chunk)
        g.poll()
    g.pump(lambda: c.state == "reset")
    s.close()


def test_tx_is_held_while_answers_wait_for_rx_buffers(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop, rx_buffers=0)
    for i in range(300):
        g.send(Header(CID, HOST_CID, 1000 + i, 5, 0, 1, Op.CREDIT_UPDATE))
        if i % 100 == 99:
            g.d.queues[1].get_used()
    # Every one of them deserves an RST, but there is nowhere to put them: TX stops after MAX_LOOSE.
    assert dev.muxer.tx_blocked()
    assert len(g.d.queues[1].buffers) > 0  # some TX packets are still waiting
    for _ in range(64):
        g.post_rx()
    g.d.kick(0)
    g.pump(lambda: len([h for h in g.received if h.op == Op.RST]) == 300)


def test_driver_reset_drops_connections(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    _, s = accept_host_conn(g, sock_path, 52)
    g.d.w(0x070, 0)  # STATUS = 0: reset (§4.2.2)
    s.settimeout(5)
    assert s.recv(10) == b""
    assert dev.muxer.connections == 0
    # The device comes back up with a new driver and works again.
    g2 = guest_of(dev, loop)
    c2, s2 = accept_host_conn(g2, sock_path, 52)
    s2.sendall(b"again")
    g2.pump(lambda: bytes(c2.data) == b"again")


def test_transport_reset_event(dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path) -> None:
    g = guest_of(dev, loop)
    _, s = accept_host_conn(g, sock_path, 52)
    dev.transport_reset()
    s.settimeout(5)
    assert s.recv(10) == b""
    g.post_event()
    g.pump(lambda: g.events == [b"\0\0\0\0"])
    # New connections still work after the event.
    c2, s2 = accept_host_conn(g, sock_path, 53)
    s2.sendall(b"ok")
    g.pump(lambda: bytes(c2.data) == b"ok")


def test_indirect_and_split_tx_chains(
    dev: VirtioVsock, loop: asyncio.AbstractEventLoop, sock_path: Path
) -> None:
    g = guest_of(dev, loop)
    c, s = accept_host_conn(g, sock_path, 52)
    h = g.header(c, Op.RW, 11)
    c.tx_cnt += 11
    raw = h.pack() + b"hello world"
    # The header split across descriptors, then the whole packet in an indirect table.
    g.d.queues[1].add([raw[:10], raw[10:30], raw[30:50], raw[50:]], [])
    g.d.kick(1)
    g.d.queues[1].add([g.header(c, Op.RW, 3).pack() + b"!!!"], [], indirect=True)
    c.tx_cnt += 3
    g.d.kick(1)
    s.settimeout(5)
    got = b""
    while len(got) < 14:
        got += s.recv(100)
    assert got == b"hello world!!!"
    assert VIRTQ_DESC_F_NEXT  # the fake builds NEXT-linked chains


def test_make_vsock_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        make_vsock(VsockSpec(cid=3, path=tmp_path / "nodir" / "v.sock"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        make_vsock(VsockSpec(cid=3, path=tmp_path / "file"))
    with pytest.raises(ConfigError, match="longer than"):
        make_vsock(VsockSpec(cid=3, path=tmp_path / ("x" * 120)))
    with pytest.raises(ConfigError, match="path= is required"):
        make_vsock(VsockSpec(cid=3))
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(tmp_path / "live"))
    live.listen()
    with pytest.raises(ConfigError, match="in use"):
        make_vsock(VsockSpec(cid=3, path=tmp_path / "live"))
    live.close()
    # A socket file nobody listens on any more (a crashed earlier run) is replaced.
    d = make_vsock(VsockSpec(cid=3, path=tmp_path / "live"))
    d.close()
    assert not (tmp_path / "live").exists()
