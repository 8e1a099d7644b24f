"""The vsock muxer: guest connections bound to host Unix sockets, on the reactor.

It owns the connection table and turns between the two sides:

* ``on_guest_packet`` takes one packet from the TX queue: a REQUEST connects to ``<path>_<port>``, RW data is
  written to the host socket (what the socket does not take waits in the connection, within the credit we
  advertised), everything else drives the connection's state machine.
* ``produce_rx`` fills one RX buffer: first RSTs for packets that named no connection, then connections'
  control packets, then data read from host sockets straight into guest memory, never more than the
  guest's credit for that connection.

Backpressure: a host socket is watched for input only while its connection has credit and nothing of it
waits for an RX buffer; when the guest stops posting RX buffers, readable sockets queue up here and are read
when buffers arrive.  The device stops taking TX packets while too many answers wait for RX buffers
(``tx_blocked``), so a guest that never reads cannot grow evmm's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path

from evmm.devices.virtio.vsock.connection import Connection, State
from evmm.devices.virtio.vsock.packet import HOST_CID, MAX_PAYLOAD, Header, Op, check_tx, reply_header
from evmm.devices.virtio.vsock.unix import HybridListener, connect_port, peer_closed
from evmm.log import log

MAX_CONNECTIONS = 1024
MAX_LOOSE = 256  # RSTs waiting for RX buffers before the device stops taking TX packets
CONNECT_TIMEOUT = 10.0  # seconds the guest has to answer a host-initiated REQUEST
FIRST_LOCAL_PORT = 1 << 30  # host ports of host-initiated connections (as Firecracker's)


def trim_views(views: list[memoryview], limit: int) -> list[memoryview]:
    """The first ``limit`` bytes of a buffer list, as a buffer list."""
    out: list[memoryview] = []
    for v in views:
        if limit <= 0:
            break
        out.append(v[:limit])
        limit -= len(out[-1])
    return out


class _Entry:
    """A connection and the host socket it is bound to."""

    __slots__ = (
        "conn",
        "dead",
        "eof",
        "fd",
        "in_control",
        "in_readable",
        "reading",
        "sock",
        "timer",
        "wants_ok",
        "wr_shut",
        "writing",
    )

    def __init__(self, conn: Connection, sock: socket.socket, *, wants_ok: bool) -> None:
        self.conn = conn
        self.sock = sock
        self.fd = sock.fileno()
        self.wants_ok = wants_ok  # host-initiated: "OK <port>\n" is owed to the client once established
        self.timer: asyncio.TimerHandle | None = None
        self.reading = False  # a reader is registered on the reactor
        self.writing = False  # a writer is registered
        self.in_readable = False  # queued to be read into an RX buffer
        self.in_control = False  # queued to send control packets
        self.eof = False  # read returned EOF
        self.wr_shut = False  # shutdown(SHUT_WR) done on the host socket
        self.dead = False


class VsockMuxer:
    def __init__(self, guest_cid: int, path: Path, listener: HybridListener | None) -> None:
        self.guest_cid = guest_cid
        self.path = path
        self._listener = listener
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_rx: Callable[[], None] = lambda: None
        self._conns: dict[tuple[int, int], _Entry] = {}
        self._loose: deque[Header] = deque()
        self._control: deque[_Entry] = deque()
        self._readable: deque[_Entry] = deque()
        self._next_port = FIRST_LOCAL_PORT
        self.dropped = 0  # guest packets not taken (bad header, wrong CID, ...)
        self.resets = 0  # connections reset for a protocol violation or a host error

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, wake_rx: Callable[[], None]) -> None:
        """The driver is up: accept host clients; ``wake_rx`` is called when something waits for RX buffers."""
        self._loop = loop
        self._wake_rx = wake_rx
        if self._listener is not None:
            self._listener.start(loop, self._on_host_request)

    def stop(self) -> None:
        """Drop every connection (host sockets closed, nothing sent to the guest) and stop accepting."""
        if self._listener is not None:
            self._listener.stop()
        for entry in list(self._conns.values()):
            self._remove(entry)
        self._loose.clear()
        self._control.clear()
        self._readable.clear()
        self._wake_rx = lambda: None

    def close(self) -> None:
        self.stop()
        if self._listener is not None:
            self._listener.close()

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ---- guest -> host -------------------------------------------------------------------------------------

    def tx_blocked(self) -> bool:
        return len(self._loose) >= MAX_LOOSE

    def on_guest_packet(self, hdr: Header, payload: list[memoryview]) -> str | None:
        """Take one TX packet whose payload buffers follow its header; returns why it was refused, or None.

        ``payload`` aliases guest memory: whatever must outlive this call is copied.
        """
        bad = check_tx(hdr, sum(len(v) for v in payload), self.guest_cid)
        entry = self._conns.get((hdr.dst_port, hdr.src_port)) if hdr.dst_cid == HOST_CID else None
        if bad is not None:
            self.dropped += 1
            if bad.reset and entry is not None:
                self._reset(entry, bad.reason)  # a stream that lost a packet cannot go on intact
                self._settle(entry)
            elif bad.reset:
                self._loose_rst(hdr)
            return bad.reason
        if entry is None:
            if hdr.op == Op.REQUEST:
                return self._guest_connect(hdr)
            if hdr.op != Op.RST:
                self._loose_rst(hdr)  # §5.10.6.4: a packet for no connection is answered with RST
            return None
        why = entry.conn.on_packet(hdr)
        if why is not None:
            self._reset(entry, why)
        elif hdr.op == Op.RW and hdr.len:
            self._to_host(entry, trim_views(payload, hdr.len))
        self._settle(entry)
        return why

    def _loose_rst(self, to: Header) -> None:
        self._loose.append(reply_header(to, Op.RST))
        self._wake_rx()

    def _guest_connect(self, hdr: Header) -> str | None:
        if len(self._conns) >= MAX_CONNECTIONS:
            self._loose_rst(hdr)
            return f"connection to port {hdr.dst_port} refused: {MAX_CONNECTIONS} connections are open"
        sock = connect_port(self.path, hdr.dst_port)
        if isinstance(sock, str):
            self._loose_rst(hdr)  # nobody listens: the guest's connect() fails with ECONNRESET
            return None
        conn = Connection(self.guest_cid, hdr.dst_port, hdr.src_port, host_initiated=False)
        conn.update_peer_credit(hdr)
        entry = _Entry(conn, sock, wants_ok=False)
        self._conns[conn.key] = entry
        self._settle(entry)
        return None

    def _to_host(self, entry: _Entry, data: list[memoryview]) -> None:
        conn = entry.conn
        sent = 0
        if not conn.to_host:
            try:
                sent = entry.sock.sendmsg(data, [], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._host_gone(entry, e)
                return
            conn.forwarded(sent)
        for v in data:
            if sent >= len(v):
                sent -= len(v)
                continue
            conn.to_host += v[sent:]
            sent = 0

    def _on_writable(self, entry: _Entry) -> None:
        conn = entry.conn
        try:
            n = entry.sock.send(conn.to_host, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._host_gone(entry, e)
            self._settle(entry)
            return
        del conn.to_host[:n]
        conn.forwarded(n)
        self._settle(entry)

    def _host_gone(self, entry: _Entry, e: OSError) -> None:
        # EPIPE/ECONNRESET: the host program closed; bytes the guest sent for it are lost, so say so with RST.
        self._reset(entry, f"host socket: {e.strerror}")

    # ---- host -> guest -------------------------------------------------------------------------------------

    def _on_host_request(self, sock: socket.socket, port: int) -> None:
        if len(self._conns) >= MAX_CONNECTIONS or self._loop is None:
            sock.close()
            return
        local = self._alloc_port(port)
        conn = Connection(self.guest_cid, local, port, host_initiated=True)
        entry = _Entry(conn, sock, wants_ok=True)
        entry.timer = self._loop.call_later(CONNECT_TIMEOUT, self._connect_timeout, entry)
        self._conns[conn.key] = entry
        self._settle(entry)

    def _alloc_port(self, peer: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFFFFFF else FIRST_LOCAL_PORT
            if (port, peer) not in self._conns:
                return port

    def _connect_timeout(self, entry: _Entry) -> None:
        entry.timer = None
        if not entry.dead and entry.conn.state is State.CONNECTING:
            self._reset(entry, f"the guest did not answer a connection to port {entry.conn.peer_port}")
            self._settle(entry)

    def _on_readable(self, entry: _Entry) -> None:
        self._set_reading(entry, False)
        if not entry.in_readable:
            entry.in_readable = True
            self._readable.append(entry)
        self._wake_rx()

    def has_rx(self) -> bool:
        return bool(self._loose or self._control or self._readable)

    def produce_rx(self, payload: list[memoryview]) -> Header | None:
        """The next packet for the guest, its payload (if any) already in ``payload``; None if nothing is due."""
        if self._loose:
            return self._loose.popleft()
        while self._control:
            entry = self._control.popleft()
            entry.in_control = False
            if entry.dead:
                continue
            hdr = entry.conn.take_control()
            self._settle(entry)
            if hdr is not None:
                return hdr
        room = min(sum(len(v) for v in payload), MAX_PAYLOAD)
        while self._readable:
            entry = self._readable.popleft()
            entry.in_readable = False
            if entry.dead:
                continue
            hdr = self._read_host(entry, payload, room)
            self._settle(entry)
            if hdr is not None:
                return hdr
            if self._loose or self._control:  # the read found EOF or an error: say so first
                return self.produce_rx(payload)
        return None

    def _read_host(self, entry: _Entry, payload: list[memoryview], room: int) -> Header | None:
        conn = entry.conn
        if not conn.can_send_data:
            return None
        limit = min(room, conn.credit)
        try:
            n = entry.sock.recvmsg_into(trim_views(payload, limit))[0]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._reset(entry, f"host socket: {e.strerror}")
            return None
        if n == 0:
            entry.eof = True
            if peer_closed(entry.sock):
                conn.host_closed()
            else:
                conn.host_eof()  # a half-close: the host may still read what the guest sends
            return None
        if n == limit:  # there may be more: stay queued, behind the others (fairness)
            entry.in_readable = True
            self._readable.append(entry)
        return conn.data_header(n)

    # ---- keeping registrations in line with the connection's state ---------------------------------------

    def _reset(self, entry: _Entry, why: str) -> None:
        self.resets += 1
        log.debug("vsock %d:%d reset: %s", entry.conn.local_port, entry.conn.peer_port, why)
        entry.conn.reset(why)

    def _settle(self, entry: _Entry) -> None:
        """After any event: bring the host socket's registrations and queues in line with the connection."""
        if entry.dead:
            return
        conn = entry.conn
        if conn.state is State.ESTABLISHED:
            if entry.wants_ok:
                entry.wants_ok = False
                self._send_ok(entry)
            if conn.guest_done_sending and not entry.wr_shut:
                entry.wr_shut = True
                with contextlib.suppress(OSError):
                    entry.sock.shutdown(socket.SHUT_WR)
            if conn.finished:
                conn.finish()
        if conn.state is State.RESETTING:
            # The RST is the last word: send it ahead of anything else and forget the connection now.
            rst = conn.take_control()
            if rst is not None:
                self._loose.append(rst)
                self._wake_rx()
            self._remove(entry)
            return
        if conn.state is State.CLOSED:
            self._remove(entry)
            return
        self._set_reading(entry, conn.can_send_data and not entry.in_readable and not entry.eof)
        self._set_writing(entry, bool(conn.to_host))
        if conn.has_control and not entry.in_control:
            entry.in_control = True
            self._control.append(entry)
            self._wake_rx()

    def _send_ok(self, entry: _Entry) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        line = f"OK {entry.conn.local_port}\n".encode()
        try:
            # A fresh socket's send buffer always has room for a 20-byte line.
            ok = entry.sock.send(line, socket.MSG_NOSIGNAL) == len(line)
        except OSError:
            ok = False
        if not ok:
            self._reset(entry, "the host client went away before the guest accepted")

    def _set_reading(self, entry: _Entry, on: bool) -> None:
        if on == entry.reading or self._loop is None:
            return
        entry.reading = on
        if on:
            self._loop.add_reader(entry.fd, self._on_readable, entry)
        else:
            self._loop.remove_reader(entry.fd)

    def _set_writing(self, entry: _Entry, on: bool) -> None:
        if on == entry.writing or self._loop is None:
            return
        entry.writing = on
        if on:
            self._loop.add_writer(entry.fd, self._on_writable, entry)
        else:
            self._loop.remove_writer(entry.fd)

    def _remove(self, entry: _Entry) -> None:
        if entry.dead:
            return
        self._set_reading(entry, False)
        self._set_writing(entry, False)
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.dead = True
        self._conns.pop(entry.conn.key, None)
        entry.sock.close()


__all__ = ["MAX_CONNECTIONS", "VsockMuxer", "trim_views"]
