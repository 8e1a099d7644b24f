"""The console plumbing between a guest device and host fds: batching, backpressure, escape keys."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable

from evmm.loop.console import ESCAPE, ConsoleIO


class FifoSink:
    """A device input side with a small FIFO, like the UART's."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got = bytearray()
        self.cb: Callable[[], None] | None = None

    def receive(self, data: bytes) -> int:
        n = min(len(data), self.room - len(self.got))
        self.got += data[:n]
        return n

    def set_rx_space_callback(self, cb: Callable[[], None]) -> None:
        self.cb = cb

    def drain(self) -> bytes:
        out = bytes(self.got)
        self.got.clear()
        assert self.cb is not None
        self.cb()
        return out


def spin(loop: asyncio.AbstractEventLoop, t: float = 0.05) -> None:
    loop.run_until_complete(asyncio.sleep(t))


def test_output_from_other_threads_arrives_in_order(loop: asyncio.AbstractEventLoop) -> None:
    r, w = os.pipe()
    io = ConsoleIO(loop, w, None)
    seen: list[bytes] = []
    io.add_output_listener(seen.append)

    def writer() -> None:
        for i in range(1000):
            io.write(b"%d," % i)

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    spin(loop)
    expected = b"".join(b"%d," % i for i in range(1000))
    assert os.read(r, 1 << 20) == expected
    assert b"".join(seen) == expected
    io.close()
    os.close(r)
    os.close(w)


def test_input_backpressure_loses_nothing(loop: asyncio.AbstractEventLoop) -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    io = ConsoleIO(loop, out_w, r)
    sink = FifoSink(room=16)
    io.attach_input(sink)
    payload = bytes(range(256)) * 4
    os.write(w, payload)
    received = bytearray()
    for _ in range(200):
        spin(loop, 0.001)
        received += sink.drain()
        if len(received) == len(payload):
            break
    assert bytes(received) == payload
    io.close()
    for fd in (r, w, out_r, out_w):
        os.close(fd)


def test_escape_key_in_a_terminal(loop: asyncio.AbstractEventLoop) -> None:
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    keys: list[bytes] = []
    io = ConsoleIO(loop, out_w, r, interactive=True, on_escape=keys.append)
    sink = FifoSink(room=64)
    io.attach_input(sink)
    os.write(w, b"ab" + bytes([ESCAPE]) + b"q" + b"c" + bytes([ESCAPE, ESCAPE]) + b"d")
    spin(loop)
    assert keys == [b"q"]
    assert bytes(sink.got) == b"abc" + bytes([ESCAPE]) + b"d"
    io.close()
    for fd in (r, w, out_r, out_w):
        os.close(fd)


def test_a_closed_reader_does_not_stop_the_guest(loop: asyncio.AbstractEventLoop) -> None:
    r, w = os.pipe()
    os.close(r)
    io = ConsoleIO(loop, w, None)
    seen: list[bytes] = []
    io.add_output_listener(seen.append)
    io.write(b"nobody is listening")
    spin(loop)  # the write to the pipe fails with EPIPE: no exception reaches the loop (the fixture checks)
    io.write(b", still")
    spin(loop)  # and output goes on: the next write is delivered to the console's listeners
    assert b"".join(seen) == b"nobody is listening, still"
    io.close()  # its last flush meets EPIPE too, and says nothing
    os.close(w)


def test_input_from_a_regular_file_is_taken_whole(loop: asyncio.AbstractEventLoop, tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    f = tmp_path / "input"
    f.write_bytes(b"echo hi\n")
    fd = os.open(f, os.O_RDONLY)
    out_r, out_w = os.pipe()
    io = ConsoleIO(loop, out_w, fd)
    sink = FifoSink(room=64)
    io.attach_input(sink)
    spin(loop)
    assert bytes(sink.got) == b"echo hi\n"
    io.close()
    for x in (fd, out_r, out_w):
        os.close(x)
