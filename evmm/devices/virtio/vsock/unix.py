"""The host side of hybrid vsock: Unix sockets named after the device's ``path`` (Firecracker's convention).

* host -> guest: a program connects to the listening socket ``path`` and writes ``CONNECT <port>\\n``; once
  the guest accepts it reads ``OK <host_port>\\n`` and then the stream.  ``HybridListener`` accepts such
  clients and reads their request line on the reactor (bounded in length and time).
* guest -> host: a guest connecting to host port P reaches whoever listens on ``<path>_<P>``
  (``connect_port``).

``parse_connect_line`` is the pure part; the rest is small, non-blocking socket plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from pathlib import Path

from evmm.unixsock import check_socket_path, listen_unix, peer_closed

MAX_LINE = 64  # "CONNECT 4294967295\n" is 19 bytes; anything much longer is not a request
HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to send its request line


def parse_connect_line(line: bytes) -> int | str:
    """The port of a ``CONNECT <port>`` line (without its newline), or why it is not one."""
    try:
        text = line.decode("ascii").rstrip("\r")
    except UnicodeDecodeError:
        return "the request line is not ASCII"
    words = text.split(" ")
    if len(words) != 2 or words[0] != "CONNECT":
        return f"expected 'CONNECT <port>', got {text[:32]!r}"
    if not words[1].isdigit() or int(words[1]) > 0xFFFFFFFF:
        return f"port {words[1][:16]!r} is not a number from 0 to 4294967295"
    return int(words[1])


def connect_port(path: Path, port: int) -> socket.socket | str:
    """A non-blocking connection to ``<path>_<port>``, or why there is none (the guest then gets an RST).

    A Unix-socket connect completes at once or fails at once; a full accept backlog (EAGAIN) is refused too,
    rather than left pending, as a busy TCP listener would refuse.
    """
    target = f"{path}_{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.connect(target)
    except OSError as e:
        sock.close()
        return f"{target}: {e.strerror or errno.errorcode.get(e.errno or 0, 'error')}"
    return sock


OnRequest = Callable[[socket.socket, int], None]


class _Handshake:
    """An accepted host client that has not yet sent its whole request line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None


class HybridListener:
    """Accepts host clients on ``path`` and hands each valid ``CONNECT <port>`` on; the rest are closed."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self._sock = sock
        self.path = path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_request: OnRequest | None = None
        self._pending: dict[int, _Handshake] = {}
        self.rejected = 0

    def start(self, loop: asyncio.AbstractEventLoop, on_request: OnRequest) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        self._on_request = on_request
        loop.add_reader(self._sock.fileno(), self._accept)

    def stop(self) -> None:
        """Stop accepting (the guest's driver went away); clients mid-handshake are closed."""
        if self._loop is None:
            return
        self._loop.remove_reader(self._sock.fileno())
        for hs in list(self._pending.values()):
            self._drop(hs)
        self._loop = None

    def close(self) -> None:
        self.stop()
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(64):  # a burst of clients must not starve the rest of the reactor
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE: the client stays in the backlog; try on the next wake-up
            client.setblocking(False)
            hs = _Handshake(client)
            self._pending[client.fileno()] = hs
            hs.timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._drop, hs)
            self._loop.add_reader(client.fileno(), self._read_line, hs)

    def _read_line(self, hs: _Handshake) -> None:
        try:
            # Peek, so bytes after the newline stay in the socket for the connection to read later.
            data = hs.sock.recv(MAX_LINE - len(hs.buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(hs)
            return
        nl = data.find(b"\n")
        take = len(data) if nl < 0 else nl + 1
        hs.sock.recv(take)  # consume what was peeked, up to and including the newline
        hs.buf += data[:take]
        if nl < 0:
            if len(hs.buf) >= MAX_LINE:
                self._drop(hs)
            return
        port = parse_connect_line(hs.buf[:-1])
        if isinstance(port, str):
            self._drop(hs)
            return
        self._forget(hs)
        assert self._on_request is not None
        self._on_request(hs.sock, port)

    def _forget(self, hs: _Handshake) -> None:
        if self._loop is not None:
            self._loop.remove_reader(hs.sock.fileno())
        if hs.timer is not None:
            hs.timer.cancel()
        self._pending.pop(hs.sock.fileno(), None)

    def _drop(self, hs: _Handshake) -> None:
        self.rejected += 1
        self._forget(hs)
        hs.sock.close()


__all__ = [
    "HybridListener",
    "check_socket_path",
    "connect_port",
    "listen_unix",
    "parse_connect_line",
    "peer_closed",
]
