"""Cached reads on file systems that refuse RWF_NOWAIT (tmpfs): mincore(2) first, then a plain read in place."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.devices.virtio.blk.backend import FileBackend
from evmm.devices.virtio.blk.device import VirtioBlk
from evmm.devices.virtio.blk.resident import Residency
from tests.unit.test_virtio_blk import T_IN, Disk, hdr

MiB = 1 << 20


def _nowait_refused(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(512)], 0, os.RWF_NOWAIT)
    except OSError as e:
        return e.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    return False


@pytest.fixture
def tmpfs_image() -> Iterator[Path]:
    """A 4 MiB image on tmpfs (/dev/shm) whose file system refuses RWF_NOWAIT, or a skip saying why not."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path("/dev/shm") / f"evmm-resident-{os.getpid()}.img"
    path.write_bytes(os.urandom(4 * MiB))
    try:
        if not _nowait_refused(path):
            pytest.skip("this kernel's tmpfs takes RWF_NOWAIT: the plain path serves it")
        yield path
    finally:
        path.unlink()


def test_residency_is_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(os.urandom(MiB))
    fd = os.open(path, os.O_RDONLY)
    r = Residency(fd, MiB)
    try:
        assert r.resident(0, 4096) and r.resident(5000, 100 << 10)  # just written: cached
        assert not r.resident(MiB - 4096, 8192)  # past the end
        assert not r.resident(0, 256 << 10)  # more than a request served in place
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not r.resident(64 << 10, 4096):  # evicted (a disk file system; tmpfs keeps its pages)
            os.pread(fd, 4096, 64 << 10)
            assert r.resident(64 << 10, 4096) and not r.resident(60 << 10, 8192)
    finally:
        r.close()
        os.close(fd)


def test_tmpfs_reads_are_served_in_place(tmpfs_image: Path) -> None:
    backend = FileBackend.open(tmpfs_image, True)
    try:
        buf = bytearray(8192)
        assert backend.read_cached([memoryview(buf)[:4096], memoryview(buf)[4096:]], 12288)
        assert bytes(buf) == tmpfs_image.read_bytes()[12288 : 12288 + 8192]
        assert not backend.read_cached([memoryview(buf)], 4 * MiB - 4096)  # past the end: a worker says so
    finally:
        backend.close()


def test_a_tmpfs_disk_completes_cached_reads_at_once(
    tmpfs_image: Path, loop: asyncio.AbstractEventLoop
) -> None:
    disk = Disk(VirtioBlk(FileBackend.open(tmpfs_image, False)), loop)
    try:
        before = disk.drv.irq.count
        for i in range(8):
            disk.q.add([hdr(T_IN, i * 8)], [4096, 1])
        disk.drv.kick(0)
        used = disk.q.get_used()  # no loop iteration: nothing went to a worker
        assert len(used) == 8 and disk.drv.irq.count == before + 1 and disk.dev.in_flight == 0
        assert used[5].data[:-1] == tmpfs_image.read_bytes()[5 * 4096 : 6 * 4096]
    finally:
        disk.dev.close()
