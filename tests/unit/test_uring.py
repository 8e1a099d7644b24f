"""The io_uring binding against the host kernel: reads and writes land, completions signal the eventfd, errors
come back as -errno for that request alone, a full ring says so, and close waits for what is in flight."""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.uring import IoUring, RingFull, available

pytestmark = pytest.mark.skipif(available() is not None, reason=available() or "")


@pytest.fixture
def ring() -> Iterator[IoUring]:
    r = IoUring(8)
    yield r
    r.close()


def wait_all(r: IoUring, n: int) -> list[tuple[int, int]]:
    done: list[tuple[int, int]] = []
    while len(done) < n:
        assert select.select([r.fd], [], [], 10)[0], "no completion signalled within 10 s"
        done += r.reap()
    return done


def test_writes_then_reads_through_the_ring(ring: IoUring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    try:
        data = os.urandom(3 * 4096)
        src = memoryview(bytearray(data))
        ring.writev(1, fd, [src[:4096], src[4096:]], 8192)
        ring.submit()
        assert wait_all(ring, 1) == [(1, len(data))]
        assert os.pread(fd, len(data), 8192) == data
        out = bytearray(5000)
        ring.readv(2, fd, [memoryview(out)[:1000], memoryview(out)[1000:]], 8192)
        ring.fsync(3, fd)
        ring.submit()
        assert sorted(wait_all(ring, 2)) == [(2, 5000), (3, 0)]
        assert bytes(out) == data[:5000]
        assert ring.in_flight == 0
        # Past the end: the kernel's answer, a short read (here none at all).
        ring.readv(4, fd, [memoryview(out)], 1 << 20)
        ring.submit()
        assert wait_all(ring, 1) == [(4, 0)]
    finally:
        os.close(fd)


def test_a_failing_request_fails_alone(ring: IoUring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT)
    try:
        buf = memoryview(bytearray(512))
        ring.writev(7, fd, [buf], 0)  # a read-only fd
        ring.readv(8, fd, [buf], 0)
        ring.submit()
        assert sorted(wait_all(ring, 2)) == [(7, -errno.EBADF), (8, 0)]
    finally:
        os.close(fd)


def test_a_full_ring_and_bad_arguments_are_refused_before_the_kernel(ring: IoUring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    try:
        bufs = [memoryview(bytearray(512)) for _ in range(ring.entries + 1)]
        for i in range(ring.entries):
            ring.readv(i, fd, [bufs[i]], 0)
        with pytest.raises(RingFull):
            ring.readv(ring.entries, fd, [bufs[-1]], 0)
        with pytest.raises(ValueError, match="already in flight"):
            ring.fsync(0, fd)
        with pytest.raises(ValueError, match="1 to 1024"):
            ring.writev(99, fd, [], 0)
        with pytest.raises(BufferError):  # a read into a read-only buffer
            ring.readv(100, fd, [memoryview(b"constant")], 0)
        ring.submit()
        assert len(wait_all(ring, ring.entries)) == ring.entries
        ring.readv(ring.entries, fd, [bufs[-1]], 0)  # room again
        ring.submit()
        assert wait_all(ring, 1) == [(ring.entries, 0)]
    finally:
        os.close(fd)


def test_close_waits_for_requests_in_flight(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"x" * 4096, 0)
    r = IoUring(4)
    buf = bytearray(4096)
    try:
        r.readv(5, fd, [memoryview(buf)], 0)  # queued, never submitted by the caller
        assert r.close() == [(5, 4096)] and bytes(buf) == b"x" * 4096
        assert r.fd == -1 and r.close() == []
    finally:
        os.close(fd)
