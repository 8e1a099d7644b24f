"""virtio-blk's requests through io_uring: what lands where, host errors for one request, the rest of a short
one done by a worker, discard still on the workers, and a reset that waits for the ring."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from evmm.devices.virtio.blk.backend import FileBackend
from evmm.devices.virtio.blk.device import VirtioBlk
from evmm.devices.virtio.blk.request import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK
from evmm.uring import available
from tests.unit.test_virtio_blk import T_DISCARD, T_FLUSH, T_IN, Disk, hdr, seg

pytestmark = pytest.mark.skipif(available() is not None, reason=available() or "")
MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


def uncached(path: Path, readonly: bool = False) -> FileBackend:
    """A backend whose reads never complete in place: every request goes to the engine."""
    b = FileBackend.open(path, readonly)
    b.read_cached = lambda views, offset: False  # type: ignore[method-assign]
    return b


def test_reads_writes_and_flushes_go_through_the_ring(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    d = Disk(VirtioBlk(uncached(image)), loop)
    try:
        assert d.dev._io.ring is not None
        data = os.urandom(3 * 4096)
        assert d.write(64, data) == VIRTIO_BLK_S_OK
        assert d.read(64, len(data), pieces=3) == (VIRTIO_BLK_S_OK, data)
        assert d.request([hdr(T_FLUSH)], [1]).status == VIRTIO_BLK_S_OK
        assert image.read_bytes()[64 * 512 : 64 * 512 + len(data)] == data
        # Nothing needed a worker thread: none was started.
        assert d.dev._io.workers._pool == [] and d.dev.in_flight == 0
        # Discard is fallocate: a worker's.
        assert d.request([hdr(T_DISCARD), seg(0, 8)], [1]).status == VIRTIO_BLK_S_OK
        assert len(d.dev._io.workers._pool) > 0
    finally:
        d.close()


def test_a_host_error_fails_that_request_alone(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    # Writable as far as the driver knows, but the fd is read-only: the kernel answers EBADF.
    backend = FileBackend(os.open(image, os.O_RDONLY), image, False)
    backend.read_cached = lambda views, offset: False  # type: ignore[method-assign]
    errors: list[str] = []
    d = Disk(VirtioBlk(backend, on_host_error=errors.append), loop)
    try:
        assert d.write(8, b"x" * 512) == VIRTIO_BLK_S_IOERR
        assert errors == [f"{image}: OUT at sector 8: {os.strerror(errno.EBADF)}"]
        assert d.read(8, 512)[0] == VIRTIO_BLK_S_OK  # the next request is fine
    finally:
        d.close()


def test_a_short_read_is_finished_by_a_worker(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    d = Disk(VirtioBlk(uncached(image)), loop)
    try:
        os.truncate(image, 2 * MiB)  # the image shrinks under the disk: the ring reads part of a request
        status, _ = d.read(2 * MiB // 512 - 4, 4096)
        assert status == VIRTIO_BLK_S_IOERR
        assert d.dev.last_error is not None and "ended before the request did" in d.dev.last_error
    finally:
        d.close()


def test_reset_waits_for_the_ring(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    d = Disk(VirtioBlk(uncached(image)), loop)
    for i in range(16):
        d.q.add([hdr(T_IN, i * 256)], [128 << 10, 1])
    d.drv.kick(0)
    assert d.dev.in_flight > 0
    d.dev.reset()  # before the reactor saw a single completion
    assert d.dev.in_flight == 0 and d.dev._io.pending == 0
    assert d.q.used_idx() == 0  # nothing reached the guest after the reset
    d.dev.close()


def test_where_io_uring_is_refused_the_workers_do_everything(
    image: Path, loop: asyncio.AbstractEventLoop
) -> None:
    d = Disk(VirtioBlk(uncached(image), uring=False), loop)
    try:
        assert d.dev._io.ring is None
        assert d.write(0, b"y" * 4096) == VIRTIO_BLK_S_OK
        assert d.read(0, 4096) == (VIRTIO_BLK_S_OK, b"y" * 4096)
        assert len(d.dev._io.workers._pool) > 0
    finally:
        d.close()
