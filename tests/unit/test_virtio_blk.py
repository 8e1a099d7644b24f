"""virtio-blk through the virtio-mmio transport and a driver-side fake, against real image files."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from evmm.config.devspec import DriveSpec
from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.blk import make_blk
from evmm.devices.virtio.blk.backend import FileBackend
from evmm.devices.virtio.blk.device import (
    VIRTIO_BLK_F_RO,
    VirtioBlk,
)
from evmm.devices.virtio.blk.request import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP
from evmm.devices.virtio.chain import VIRTQ_DESC_F_NEXT
from evmm.errors import ConfigError
from tests.fakes.virtio_driver import DriverQueue, MmioDriver, Used

MiB = 1 << 20
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


@dataclass
class Done:
    length: int  # the used length the device reported
    whole: bytes  # every device-writable byte of the chain after completion

    @property
    def status(self) -> int | None:
        return self.whole[-1] if self.whole else None

    @property
    def data(self) -> bytes:
        return self.whole[:-1]


class Disk:
    """A VirtioBlk brought up by the fake driver, with helpers to post requests and wait for them."""

    def __init__(self, dev: VirtioBlk, loop: asyncio.AbstractEventLoop, *, event_idx: bool = False) -> None:
        self.dev = dev
        self.loop = loop
        self.drv = MmioDriver(dev, loop=loop)
        self.features = self.drv.bring_up(event_idx=event_idx)
        self.q: DriverQueue = self.drv.queues[0]

    def wait(self, n: int, timeout: float = 10.0) -> list[Used]:
        got: list[Used] = []
        deadline = time.monotonic() + timeout
        while True:
            got += self.q.get_used()
            if len(got) >= n:
                return got
            assert time.monotonic() < deadline, f"{len(got)} of {n} requests completed"
            self.loop.run_until_complete(asyncio.sleep(0.002))

    def request(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> Done:
        head = self.q.add(readable, writable, indirect=indirect)
        bufs = [(addr, n) for addr, n, w in self.q.buffers[head] if w]
        self.drv.kick(0)
        (used,) = self.wait(1)
        assert used.head == head
        # The status is the chain's LAST writable byte whatever the used length says, so read it all.
        return Done(used.length, b"".join(self.drv.mem.read(a, n) for a, n in bufs))

    def read(self, sector: int, n: int, *, pieces: int = 1) -> tuple[int | None, bytes]:
        sizes = [n // pieces] * pieces
        done = self.request([hdr(T_IN, sector)], [*sizes, 1])
        assert done.length == (n + 1 if done.status == VIRTIO_BLK_S_OK else 1)
        return done.status, done.data

    def write(self, sector: int, data: bytes) -> int | None:
        done = self.request([hdr(T_OUT, sector), data], [1])
        assert done.length == 1
        return done.status

    def close(self) -> None:
        self.dev.reset()
        self.dev.close()


@pytest.fixture
def disk(image: Path, loop: asyncio.AbstractEventLoop) -> Iterator[Disk]:
    d = Disk(make_blk(DriveSpec(image, id="disk0")), loop)
    yield d
    d.close()


def test_features_and_config_space(disk: Disk, image: Path) -> None:
    # Checked against virtio 1.2's numbers, not the constants the device was built from: feature bits of
    # §5.2.3 and the field offsets of struct virtio_blk_config (§5.2.4).
    feats = disk.dev.features()
    for bit in (1, 2, 6, 9, 13, 14):  # SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, DISCARD, WRITE_ZEROES
        assert feats >> bit & 1, bit
    for bit in (5, 10, 11, 12):  # RO (the image is writable), TOPOLOGY, CONFIG_WCE, MQ: not offered
        assert not feats >> bit & 1, bit
    cfg = disk.drv.config
    assert cfg(0, 8) == image.stat().st_size // 512  # capacity, in 512-byte sectors whatever blk_size is
    assert cfg(8, 4) == 1 << 20  # size_max: at most 1 MiB in one segment
    # seg_max: a request's data segments must fit the 256-entry ring with its header and status descriptors.
    assert cfg(12, 4) == 256 - 2
    assert cfg(16, 4) == 0  # geometry (cylinders, heads, sectors): not offered
    assert cfg(20, 4) == 512  # blk_size
    assert (cfg(24, 4), cfg(28, 4)) == (0, 0)  # topology: not offered
    assert (cfg(32, 1), cfg(34, 2)) == (0, 1)  # writeback (no CONFIG_WCE), num_queues
    # Discard and write-zeroes limits: 2 GiB and 32 ranges a request, discards aligned to 4 KiB (8 sectors).
    assert (cfg(36, 4), cfg(40, 4), cfg(44, 4)) == (1 << 22, 32, 8)
    assert (cfg(48, 4), cfg(52, 4), cfg(56, 1)) == (1 << 22, 32, 1)  # and write_zeroes_may_unmap
    assert (cfg(60, 4), cfg(64, 4), cfg(68, 4)) == (0, 0, 0)  # secure erase: not offered
    assert len(disk.dev.config()) == 72  # the whole struct, secure-erase fields included
    assert cfg(72, 4) == 0  # nothing past it


def test_write_then_read_round_trip(disk: Disk, image: Path) -> None:
    data = os.urandom(8192)
    assert disk.write(16, data) == VIRTIO_BLK_S_OK
    assert image.read_bytes()[16 * 512 : 16 * 512 + 8192] == data
    assert disk.read(16, 8192) == (VIRTIO_BLK_S_OK, data)
    assert disk.read(0, 512) == (VIRTIO_BLK_S_OK, image.read_bytes()[:512])


def test_multi_segment_and_indirect(disk: Disk, image: Path) -> None:
    parts = [os.urandom(512), os.urandom(1024), os.urandom(2560)]
    done = disk.request([hdr(T_OUT, 100), *parts], [1], indirect=True)
    assert done.status == VIRTIO_BLK_S_OK
    assert image.read_bytes()[100 * 512 : 100 * 512 + 4096] == b"".join(parts)
    for indirect in (False, True):
        done = disk.request([hdr(T_IN, 100)], [1024, 512, 2048, 512, 1], indirect=indirect)
        assert done.length == 4097 and done.whole == b"".join(parts) + b"\0"


def test_header_and_data_in_one_buffer(disk: Disk, image: Path) -> None:
    data = os.urandom(1024)
    assert disk.request([hdr(T_OUT, 3) + data], [1]).status == VIRTIO_BLK_S_OK
    assert image.read_bytes()[3 * 512 : 3 * 512 + 1024] == data
    done = disk.request([hdr(T_IN, 3)], [1024 + 1])  # data and status in one writable buffer
    assert done.whole == data + b"\0"


def test_reads_through_the_workers_too(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    d = Disk(VirtioBlk(FileBackend.open(image, False), inline_reads=False), loop)
    try:
        assert d.read(7, 4096) == (VIRTIO_BLK_S_OK, image.read_bytes()[7 * 512 : 7 * 512 + 4096])
    finally:
        d.close()


def test_flush_calls_fdatasync(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    assert disk.request([hdr(T_FLUSH)], [1]).status == VIRTIO_BLK_S_OK
    assert synced == [disk.dev.backend.fd]


def test_get_id(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    for spec, want in (
        (DriveSpec(image, id="disk0"), b"disk0".ljust(20, b"\0")),
        (DriveSpec(image, id="disk0", serial="S" * 25), b"S" * 20),  # 20 bytes: no NUL (§5.2.6)
        (DriveSpec(image), b"\0" * 20),
    ):
        d = Disk(make_blk(spec), loop)
        done = d.request([hdr(T_GET_ID)], [20, 1])
        assert done.whole == want + b"\0" and done.length == 21
        done = d.request([hdr(T_GET_ID)], [8, 1])  # a short buffer gets what fits
        assert done.whole == want[:8] + b"\0"
        d.close()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_discard_frees_blocks(disk: Disk, image: Path) -> None:
    os.sync()
    before = allocated(image)
    assert before >= 4 * MiB
    done = disk.request([hdr(T_DISCARD) + seg(0, 2048) + seg(4096, 2048)], [1])  # two 1 MiB ranges
    assert done.status == VIRTIO_BLK_S_OK
    assert allocated(image) <= before - 2 * MiB
    assert image.stat().st_size == 4 * MiB  # the image keeps its size
    assert disk.read(0, 4096) == (VIRTIO_BLK_S_OK, bytes(4096))


def test_write_zeroes_with_and_without_unmap(disk: Disk, image: Path) -> None:
    before = allocated(image)
    assert disk.request([hdr(T_WRITE_ZEROES) + seg(8, 8)], [1]).status == VIRTIO_BLK_S_OK
    assert disk.read(8, 4096) == (VIRTIO_BLK_S_OK, bytes(4096))
    done = disk.request([hdr(T_WRITE_ZEROES) + seg(2048, 2048, 1)], [1])  # UNMAP: may free the blocks
    assert done.status == VIRTIO_BLK_S_OK
    assert image.read_bytes()[MiB : 2 * MiB] == bytes(MiB)
    assert allocated(image) <= before - MiB
    assert image.read_bytes()[2 * MiB : 2 * MiB + 512] != bytes(512)  # neighbours untouched


def test_write_zeroes_falls_back_to_writing_zeroes(
    disk: Disk, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evmm.devices.virtio.blk import backend

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(backend, "fallocate", unsupported)
    assert disk.request([hdr(T_WRITE_ZEROES) + seg(16, 16, 1)], [1]).status == VIRTIO_BLK_S_OK
    assert image.read_bytes()[16 * 512 : 32 * 512] == bytes(8192)
    assert (
        disk.request([hdr(T_DISCARD) + seg(64, 8)], [1]).status == VIRTIO_BLK_S_OK
    )  # advisory: OK, nothing freed


def test_read_only_drive_refuses_writes(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    original = image.read_bytes()
    d = Disk(make_blk(DriveSpec(image, readonly=True)), loop)
    try:
        assert d.features & VIRTIO_BLK_F_RO
        assert d.write(0, b"x" * 512) == VIRTIO_BLK_S_IOERR
        assert d.request([hdr(T_DISCARD) + seg(0, 8)], [1]).status == VIRTIO_BLK_S_IOERR
        assert d.request([hdr(T_WRITE_ZEROES) + seg(0, 8)], [1]).status == VIRTIO_BLK_S_IOERR
        assert d.request([hdr(T_FLUSH)], [1]).status == VIRTIO_BLK_S_OK
        assert d.read(0, 512) == (VIRTIO_BLK_S_OK, original[:512])
        assert image.read_bytes() == original
        assert "read-only" in (d.dev.last_error or "")
    finally:
        d.close()


def test_out_of_range_and_unsupported(disk: Disk) -> None:
    capacity = 4 * MiB // 512
    assert disk.read(capacity - 1, 1024)[0] == VIRTIO_BLK_S_IOERR
    assert disk.write(capacity, b"x" * 512) == VIRTIO_BLK_S_IOERR
    assert disk.read(capacity - 2, 1024)[0] == VIRTIO_BLK_S_OK
    assert disk.request([hdr(10)], [8, 1]).status == VIRTIO_BLK_S_UNSUPP  # GET_LIFETIME
    assert disk.request([hdr(0x7777)], [1]).status == VIRTIO_BLK_S_UNSUPP
    assert disk.read(0, 100)[0] == VIRTIO_BLK_S_IOERR  # not whole sectors


def test_missing_status_byte_and_hostile_chains(disk: Disk) -> None:
    done = disk.request([hdr(T_OUT, 0), b"x" * 512], [])
    assert (
        done.length == 0 and done.status is None
    )  # nowhere to put a status: a zero-length completion, and the device goes on
    # A descriptor chain that loops: refused by the chain walker, completed with length 0.
    disk.q.add_raw([(0x200000, 16, VIRTQ_DESC_F_NEXT, 1), (0x200010, 16, VIRTQ_DESC_F_NEXT, 0)])
    disk.drv.kick(0)
    assert [u.length for u in disk.wait(1)] == [0]
    assert disk.write(0, b"y" * 512) == VIRTIO_BLK_S_OK
    assert disk.drv.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET == 0
    assert disk.dev.failed >= 2


class FailingBackend(FileBackend):
    """Host errors on demand: EIO for reads, ENOSPC for writes, EIO for flushes."""

    def readv(self, views: list[memoryview], offset: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def writev(self, views: list[memoryview], offset: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def read_cached(self, views: list[memoryview], offset: int) -> bool:
        return False


def test_host_errors_become_ioerr(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    backend = FailingBackend(os.open(image, os.O_RDWR), image, False)
    d = Disk(VirtioBlk(backend), loop)
    try:
        assert d.read(0, 512)[0] == VIRTIO_BLK_S_IOERR
        assert "Input/output error" in (d.dev.last_error or "")
        assert d.write(0, b"x" * 512) == VIRTIO_BLK_S_IOERR
        assert "No space left" in (d.dev.last_error or "")
        assert d.request([hdr(T_FLUSH)], [1]).status == VIRTIO_BLK_S_IOERR
        assert d.request([hdr(T_GET_ID)], [20, 1]).status == VIRTIO_BLK_S_OK  # the device still works
    finally:
        d.close()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a sparse image on it runs out of space for real (needs CAP_SYS_ADMIN)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_is_reported(tiny_tmpfs: Path, loop: asyncio.AbstractEventLoop) -> None:
    image = tiny_tmpfs / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    d = Disk(make_blk(DriveSpec(image)), loop)
    try:
        assert d.write(0, b"a" * 32768) == VIRTIO_BLK_S_OK
        assert d.write(1024, os.urandom(256 << 10)) == VIRTIO_BLK_S_IOERR
        assert "No space left" in (d.dev.last_error or "")
        assert d.read(0, 512) == (VIRTIO_BLK_S_OK, b"a" * 512)
    finally:
        d.close()


class GatedBackend(FileBackend):
    """Every blocking call waits for ``gate``; ``finished`` counts calls that returned."""

    gate: threading.Event
    finished: int

    def _hold(self) -> None:
        assert self.gate.wait(10)
        self.finished += 1

    def readv(self, views: list[memoryview], offset: int) -> None:
        self._hold()
        super().readv(views, offset)

    def writev(self, views: list[memoryview], offset: int) -> None:
        self._hold()
        super().writev(views, offset)

    def read_cached(self, views: list[memoryview], offset: int) -> bool:
        return False


def gated(path: Path) -> GatedBackend:
    b = GatedBackend(os.open(path, os.O_RDWR), path, False)
    b.gate = threading.Event()
    b.finished = 0
    return b


def test_a_batch_of_completions_raises_one_interrupt(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    backend = gated(image)
    d = Disk(VirtioBlk(backend), loop)
    try:
        n = 16
        for i in range(n):
            d.q.add([hdr(T_IN, i * 8)], [4096, 1])
        d.drv.kick(0)
        assert d.dev.in_flight == n and d.drv.irq.count == 0
        backend.gate.set()
        deadline = time.monotonic() + 10
        while backend.finished < n:  # every worker done before the reactor looks
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.01)
        used = d.wait(n)
        assert sorted(u.head for u in used) == sorted(set(u.head for u in used)) and len(used) == n
        assert d.drv.irq.count == 1
    finally:
        d.close()


def test_cached_reads_complete_at_once_with_one_interrupt(disk: Disk, image: Path) -> None:
    disk.read(0, 4096)  # the image is in the page cache: it was just written
    before = disk.drv.irq.count
    for i in range(8):
        disk.q.add([hdr(T_IN, i * 8)], [4096, 1])
    disk.drv.kick(0)
    used = disk.q.get_used()  # no loop iteration needed: served in place (RWF_NOWAIT)
    assert len(used) == 8 and disk.drv.irq.count == before + 1
    assert used[3].data[:-1] == image.read_bytes()[3 * 4096 : 4 * 4096]


def test_event_idx_publishes_avail_event(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    d = Disk(make_blk(DriveSpec(image)), loop, event_idx=True)
    try:
        for i in range(3):
            d.q.add([hdr(T_IN, i)], [512, 1])
        d.drv.kick(0)
        d.wait(3)
        assert d.q.avail_event() == 3  # §2.7.10: kick me when you add the 4th
    finally:
        d.close()


def test_replace_backend_changes_capacity(disk: Disk, tmp_path: Path) -> None:
    bigger = tmp_path / "bigger.img"
    bigger.write_bytes(b"\x42" * (8 * MiB))
    gen = disk.drv.r(regs.CONFIG_GENERATION)
    disk.dev.replace_backend(bigger, readonly=False)
    assert disk.drv.config(0, 8) == 8 * MiB // 512
    assert disk.drv.r(regs.CONFIG_GENERATION) != gen
    assert disk.drv.ack_interrupt() & regs.INT_CONFIG
    assert disk.read(8 * MiB // 512 - 1, 512) == (VIRTIO_BLK_S_OK, b"\x42" * 512)


def test_replace_backend_waits_for_requests_in_flight(
    image: Path, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    backend = gated(image)
    d = Disk(VirtioBlk(backend), loop)
    other = tmp_path / "other.img"
    other.write_bytes(b"\x17" * MiB)
    try:
        d.q.add([hdr(T_IN, 0)], [512, 1])
        d.drv.kick(0)
        d.dev.replace_backend(other, readonly=False)
        assert d.dev.backend is backend  # not while a request is in flight on it
        d.q.add([hdr(T_IN, 0)], [512, 1])  # held in the ring until the swap
        d.drv.kick(0)
        assert d.dev.in_flight == 1
        backend.gate.set()
        first, second = d.wait(2)
        assert first.data[:-1] == image.read_bytes()[:512]
        assert second.data[:-1] == b"\x17" * 512
        assert d.drv.config(0, 8) == MiB // 512
        assert backend.fd == -1  # the old image was closed
    finally:
        d.close()


def test_replace_with_a_bad_path_keeps_the_old_image(disk: Disk, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        disk.dev.replace_backend(tmp_path / "nope.img", readonly=False)
    assert disk.read(0, 512)[0] == VIRTIO_BLK_S_OK


def test_reset_drops_results_of_requests_in_flight(image: Path, loop: asyncio.AbstractEventLoop) -> None:
    backend = gated(image)
    d = Disk(VirtioBlk(backend), loop)
    for i in range(4):
        d.q.add([hdr(T_IN, i)], [512, 1])
    d.drv.kick(0)
    status_addr = d.q.buffers[0][-1][0]
    opener = threading.Timer(0.1, backend.gate.set)
    opener.start()
    d.drv.w(regs.STATUS, 0)  # the driver resets: the device waits for the workers, then forgets them
    assert backend.finished == 4 and d.dev.in_flight == 0
    loop.run_until_complete(asyncio.sleep(0.02))
    assert d.q.used_idx() == 0  # nothing published after the reset
    assert d.drv.mem.read(status_addr, 1) == b"\xee"  # and no status written
    d.dev.close()
    d.drv.mem.close()  # no view of guest memory is left behind (mmap refuses to close otherwise)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.img", "no such file"),
        (lambda p: p, "is a directory"),
    ],
)
def test_make_blk_errors(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message) as e:
        make_blk(DriveSpec(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_make_blk_unwritable_and_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.img"
    path.write_bytes(bytes(4096))
    real_open = os.open

    def refusing_open(p: object, flags: int, *args: int) -> int:
        if Path(str(p)) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(p, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)  # root reads and writes anything: fake the refusal
    with pytest.raises(ConfigError, match=r"cannot open for writing.*readonly=on") as e:
        make_blk(DriveSpec(path))
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match=r"cannot open for reading: Permission denied$"):
        make_blk(DriveSpec(path, readonly=True))


def test_make_blk_on_a_read_only_file_system(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "disk.img").write_bytes(bytes(4096))
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(ConfigError, match="cannot open for writing: Read-only file system"):
            make_blk(DriveSpec(mnt / "disk.img"))
        make_blk(DriveSpec(mnt / "disk.img", readonly=True)).close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
