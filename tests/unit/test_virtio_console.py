"""virtio-console through the driver-side fake: socket, pty and fd endpoints, backpressure both ways."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from evmm.config.devspec import ConsoleSpec
from evmm.devices.virtio.console import (
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_SIZE,
    VirtioConsole,
    make_console,
)
from evmm.devices.virtio.console_backend import DETACHED_KEEP, FdBackend, PtyBackend, SocketBackend
from evmm.errors import ConfigError
from tests.fakes.virtio_driver import MmioDriver

RX, TX = 0, 1
_opened: list[socket.socket] = []  # clients, closed after each test


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def pump(loop: asyncio.AbstractEventLoop, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        loop.run_until_complete(asyncio.sleep(0.001))


def spin(loop: asyncio.AbstractEventLoop, rounds: int = 20) -> None:
    for _ in range(rounds):
        loop.run_until_complete(asyncio.sleep(0.001))


class Guest:
    """The guest side: writes go through transmitq, reads come from receiveq buffers it posts."""

    def __init__(
        self, dev: VirtioConsole, loop: asyncio.AbstractEventLoop, rx_buffers: int = 8, size: int = 4096
    ):
        self.d = MmioDriver(dev, loop=loop)
        self.d.bring_up()
        self.size = size
        self.input = bytearray()
        for _ in range(rx_buffers):
            self.d.queues[RX].add([], [size])
        self.d.kick(RX)

    def write(self, data: bytes) -> None:
        self.d.queues[TX].get_used()
        self.d.queues[TX].add([data], [])
        self.d.kick(TX)

    def read(self, repost: bool = True) -> bytes:
        got = b"".join(u.data for u in self.d.queues[RX].get_used())
        self.input += got
        if repost and got:
            for _ in range(len(got) // self.size + 1):
                self.d.queues[RX].add([], [self.size])
            self.d.kick(RX)
        return got


@pytest.fixture
def sock_console(tmp_path: Path) -> Iterator[tuple[VirtioConsole, Path]]:
    path = tmp_path / "hvc.sock"
    dev = make_console(ConsoleSpec("socket", path), None)
    yield dev, path
    dev.reset()
    dev.close()


def client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _opened.append(s)
    s.connect(str(path))
    s.setblocking(False)
    return s


def recv_until(loop: asyncio.AbstractEventLoop, s: socket.socket, n: int) -> bytes:
    got = bytearray()

    def more() -> bool:
        try:
            got.extend(s.recv(1 << 16))
        except BlockingIOError:
            pass
        return len(got) >= n

    pump(loop, more)
    return bytes(got)


def test_config_and_features(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, _ = sock_console
    g = Guest(dev, loop)
    feats = g.d.device_features()
    assert feats & VIRTIO_CONSOLE_F_SIZE and feats & VIRTIO_CONSOLE_F_EMERG_WRITE
    assert not feats & (1 << 1)  # no MULTIPORT: one port, hvc0
    assert (g.d.config(0, 2), g.d.config(2, 2)) == (80, 24)
    before = g.d.irq.count
    dev.set_size(132, 43)
    assert (g.d.config(0, 2), g.d.config(2, 2)) == (132, 43)
    assert g.d.irq.count == before + 1 and g.d.r(0x060) & 2  # a config-change interrupt (§5.3.6)


def test_output_reaches_the_socket_client(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    g.write(b"boot log line\n")  # nobody attached yet: kept for the first client
    s = client(path)
    g.write(b"login: ")
    assert recv_until(loop, s, 21) == b"boot log line\nlogin: "
    assert [u.length for u in g.d.queues[TX].get_used()] == [0]  # everything was taken at once


def test_input_reaches_the_guest(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    s = client(path)
    pump(loop, lambda: dev.backend.attached)  # type: ignore[attr-defined]
    s.send(b"echo hi\r")
    pump(loop, lambda: bool(g.read()) or bytes(g.input) == b"echo hi\r")
    assert bytes(g.input) == b"echo hi\r"


def test_input_backpressure(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop, rx_buffers=2, size=1000)
    s = client(path)
    data = os.urandom(50_000)
    s.setblocking(True)
    s.sendall(data)
    spin(loop)
    # Two buffers' worth reached the guest; the rest waits in the socket, not in evmm.
    first = g.read(repost=False)
    assert first == data[:2000]
    spin(loop)
    assert g.read(repost=False) == b""

    # Buffers again, two at a time: the rest arrives, in order.
    def two_more() -> bool:
        for _ in range(2):
            g.d.queues[RX].add([], [1000])
        g.d.kick(RX)
        loop.run_until_complete(asyncio.sleep(0))
        g.read(repost=False)
        return len(g.input) >= len(data)

    pump(loop, two_more, 10)
    assert bytes(g.input) == data


def test_output_while_the_client_is_slow_is_buffered_not_blocking(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    s = client(path)
    pump(loop, lambda: dev.backend.attached)  # type: ignore[attr-defined]
    data = os.urandom(600_000)  # more than a Unix socket buffers
    for i in range(0, len(data), 4096):
        g.write(data[i : i + 4096])
    assert dev.bytes_out == len(data)  # the guest never waited
    assert recv_until(loop, s, len(data)) == data


def test_detach_keeps_recent_output_and_one_client_at_a_time(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    first = client(path)
    pump(loop, lambda: dev.backend.attached)  # type: ignore[attr-defined]
    second = client(path)  # waits in the backlog
    g.write(b"to the first")
    assert recv_until(loop, first, 12) == b"to the first"
    spin(loop)
    with pytest.raises(BlockingIOError):
        second.recv(100)
    first.close()
    spin(loop)
    # The first left; the second is attached now (accept happens when it is the only one).
    g.write(b"to the second")
    assert recv_until(loop, second, 13) == b"to the second"
    second.close()
    pump(loop, lambda: not dev.backend.attached)  # type: ignore[attr-defined]
    # Nobody attached: only the newest DETACHED_KEEP bytes are kept.
    blob = os.urandom(DETACHED_KEEP + 5000)
    for i in range(0, len(blob), 4096):
        g.write(blob[i : i + 4096])
    third = client(path)
    assert recv_until(loop, third, DETACHED_KEEP) == blob[-DETACHED_KEEP:]
    assert dev.backend.dropped == 5000


def test_half_closed_client_still_gets_output(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    s = client(path)
    s.send(b"ls\n")
    s.shutdown(socket.SHUT_WR)
    pump(loop, lambda: bool(g.read()) or bytes(g.input) == b"ls\n")
    g.write(b"file1 file2\n")
    assert recv_until(loop, s, 12) == b"file1 file2\n"


def test_pty_round_trip(loop: asyncio.AbstractEventLoop) -> None:
    dev = make_console(ConsoleSpec("pty"), None)
    assert isinstance(dev.backend, PtyBackend) and dev.endpoint.startswith("pty /dev/pts/")
    g = Guest(dev, loop)
    user = os.open(dev.backend.pty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(user, b"typed\n")
        pump(loop, lambda: bool(g.read()) or bytes(g.input) == b"typed\n")
        g.write(b"printed\r\n")
        got = bytearray()

        def more() -> bool:
            try:
                got.extend(os.read(user, 100))
            except BlockingIOError:
                pass
            return bytes(got) == b"printed\r\n"  # raw: no echo of "typed", no \n -> \r\n mangling

        pump(loop, more)
    finally:
        os.close(user)
        dev.reset()
        dev.close()


def test_given_fds(loop: asyncio.AbstractEventLoop) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    dev = make_console(ConsoleSpec("stdio"), (in_r, out_w))
    assert isinstance(dev.backend, FdBackend)
    g = Guest(dev, loop)
    os.write(in_w, b"input")
    os.close(in_w)  # EOF: the guest keeps running without input
    pump(loop, lambda: bool(g.read()) or bytes(g.input) == b"input")
    g.write(b"output")
    pump(loop, lambda: True)
    os.set_blocking(out_r, True)
    assert os.read(out_r, 100) == b"output"
    dev.reset()
    dev.close()
    assert os.get_blocking(out_w)  # restored
    for fd in (in_r, out_r, out_w):
        os.close(fd)


def test_a_terminal_endpoint_passes_its_window_size_on(loop: asyncio.AbstractEventLoop) -> None:
    """--virtio-console stdio on a terminal: hvc0 starts at the window's size and follows it (SIGWINCH)."""
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        dev = make_console(ConsoleSpec("stdio"), (slave, slave))
        g = Guest(dev, loop)
        assert (g.d.config(0, 2), g.d.config(2, 2)) == (100, 30)
        before = g.d.irq.count
        dev.follow_endpoint_size()  # nothing changed: no interrupt
        assert g.d.irq.count == before
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 45, 160, 0, 0))
        dev.follow_endpoint_size()
        assert (g.d.config(0, 2), g.d.config(2, 2)) == (160, 45)
        assert g.d.irq.count == before + 1 and g.d.r(0x060) & 2  # config change (§5.3.6)
        dev.reset()
        dev.close()
    finally:
        os.close(master)
        os.close(slave)


def test_input_from_a_regular_file(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    script = tmp_path / "script"
    script.write_bytes(b"uname -a\npoweroff\n")
    out_r, out_w = os.pipe()
    with script.open("rb") as f:
        dev = VirtioConsole(FdBackend(f.fileno(), out_w))  # epoll refuses regular files
        g = Guest(dev, loop)

        def whole() -> bool:
            g.read()
            return bytes(g.input) == b"uname -a\npoweroff\n"

        pump(loop, whole)  # raises if the whole file does not arrive
        assert bytes(g.input) == b"uname -a\npoweroff\n"
        dev.reset()
        dev.close()
    os.close(out_r)
    os.close(out_w)


def test_emergency_write(sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    s = client(path)
    pump(loop, lambda: dev.backend.attached)  # type: ignore[attr-defined]
    for ch in b"panic":
        g.d.transport.write(0x100 + 8, 4, ch)  # emerg_wr (§5.3.4)
    assert recv_until(loop, s, 5) == b"panic"


def test_hostile_chains_fail_alone(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop, rx_buffers=0)
    s = client(path)
    # transmitq: a buffer outside guest RAM, then a good one.
    q = g.d.queues[TX]
    slot = q.free.pop()
    q.mem.write(q.desc + 16 * slot, struct.pack("<QIHH", 1 << 40, 10, 0, 0))
    q.publish(slot)
    g.write(b"good")
    assert recv_until(loop, s, 4) == b"good"
    # receiveq: a buffer the device cannot write is completed empty; the next one gets the input.
    g.d.queues[RX].add([b"readonly"], [])
    g.d.queues[RX].add([], [64])
    g.d.kick(RX)
    s.send(b"x")
    pump(loop, lambda: bool(g.read(False)) or bytes(g.input) == b"x")


def test_reset_stops_reading_input(
    sock_console: tuple[VirtioConsole, Path], loop: asyncio.AbstractEventLoop
) -> None:
    dev, path = sock_console
    g = Guest(dev, loop)
    s = client(path)
    pump(loop, lambda: dev.backend.attached)  # type: ignore[attr-defined]
    g.d.w(0x070, 0)
    s.send(b"after reset")
    spin(loop)
    assert g.read(False) == b""
    g2 = Guest(dev, loop)
    pump(loop, lambda: bool(g2.read()) or bytes(g2.input) == b"after reset")


def test_make_console_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="taken by the serial"):
        make_console(ConsoleSpec("stdio"), None)
    with pytest.raises(ConfigError, match="does not exist"):
        make_console(ConsoleSpec("socket", tmp_path / "no" / "s"), None)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        make_console(ConsoleSpec("socket", tmp_path / "f"), None)
    b = SocketBackend(tmp_path / "s")
    with pytest.raises(ConfigError, match="in use"):
        make_console(ConsoleSpec("socket", tmp_path / "s"), None)
    b.close()
    assert not (tmp_path / "s").exists()
