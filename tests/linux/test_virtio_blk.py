"""virtio-blk against Linux's virtio_blk driver (issue 4, "Done means"): ``evmm run --drive ...``.

The guest writes random data to /dev/vda, syncs, drops its caches and reads it back; the host hashes the
image and must see the same SHA-256.  A read-only drive refuses writes (in the guest's block layer, and in
evmm when the guest forces the disk writable); ``blkdiscard`` frees the image's blocks; two drives are vda
and vdb with their serials (GET_ID); and data the guest fsynced is in the image after the VMM is SIGKILLed.

EVMM_BLK_TEST_MIB sets the size of the write/read-back test (default 64 MiB, the issue's figure).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, Guest, evmm_run_argv

BOOT_TIMEOUT = 120.0
MiB = 1 << 20
TEST_MIB = int(os.environ.get("EVMM_BLK_TEST_MIB", "64"))
IO_TIMEOUT = 900.0  # seconds for the big write or read; under the TCG test host everything is ~10-20x slower
SHA_RE = re.compile(r"\b([0-9a-f]{64})\b")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # /tmp: inside the KVM test host the host root is a read-only share and /tmp a tmpfs of its own.
    with tempfile.TemporaryDirectory(prefix="evmm-blk-", dir="/tmp") as d:
        yield Path(d)


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def sha256_of(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left:
            chunk = f.read(min(left, MiB))
            assert chunk, f"{path} is shorter than {length} bytes"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def boot(launch: GuestFactory, assets: GuestAssets, drives: list[str], name: str, board: str) -> Guest:
    argv = evmm_run_argv(assets.vmlinux, assets.initramfs, board=board)
    for d in drives:
        argv += ["--drive", d]
    guest = launch(argv, name)
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    return guest


def poweroff(guest: Guest) -> None:
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def guest_sha256(guest: Guest, command: str) -> str:
    m = SHA_RE.search(guest.check(f"{command} | sha256sum", timeout=IO_TIMEOUT))
    assert m is not None
    return m.group(1)


@pytest.mark.both_boards
def test_guest_writes_and_reads_back_what_the_host_sees(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path, board: str
) -> None:
    image = sparse_image(workdir / "disk.img", (TEST_MIB + 16) * MiB)
    guest = boot(launch, guest_assets, [f"path={image}"], f"evmm-blk-rw-{board}", board)
    size = int(guest.check("cat /sys/block/vda/size"))
    assert size == (TEST_MIB + 16) * MiB // 512
    # Random data written through the page cache; conv=fsync ends with a FLUSH.
    guest.check(f"dd if=/dev/urandom of=/dev/vda bs=1M count={TEST_MIB} conv=fsync 2>&1", timeout=IO_TIMEOUT)
    guest.check("sync; echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs /dev/vda")
    read_back = guest_sha256(guest, f"dd if=/dev/vda bs=1M count={TEST_MIB} 2>/dev/null")
    assert sha256_of(image, TEST_MIB * MiB) == read_back
    assert allocated(image) >= TEST_MIB * MiB
    poweroff(guest)


def test_flush_is_durable_when_the_vmm_is_killed(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path, board: str
) -> None:
    image = sparse_image(workdir / "disk.img", 8 * MiB)
    guest = boot(launch, guest_assets, [f"path={image}"], f"evmm-blk-durable-{board}", board)
    marker = "evmm-durable-" + os.urandom(8).hex()
    # conv=fsync: the guest fsyncs /dev/vda, which its driver turns into VIRTIO_BLK_T_FLUSH.
    guest.check(f"echo {marker} | dd of=/dev/vda bs=4096 seek=100 conv=sync,fsync 2>/dev/null")
    guest.close()  # SIGKILL to the VMM's process group, no shutdown of any kind
    assert guest.proc.returncode == -9
    with open(image, "rb") as f:
        f.seek(100 * 4096)
        assert f.read(len(marker)).decode() == marker


def test_discard_frees_the_images_blocks(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path, board: str
) -> None:
    image = sparse_image(workdir / "disk.img", 32 * MiB)
    guest = boot(launch, guest_assets, [f"path={image}"], f"evmm-blk-discard-{board}", board)
    assert int(guest.check("cat /sys/block/vda/queue/discard_max_bytes")) > 0
    guest.check("dd if=/dev/urandom of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null", timeout=IO_TIMEOUT)
    full = allocated(image)
    assert full >= 16 * MiB
    guest.check("blkdiscard /dev/vda")
    emptied = allocated(image)
    assert emptied <= full - 15 * MiB, f"{full} -> {emptied} bytes allocated"
    assert image.stat().st_size == 32 * MiB
    poweroff(guest)


def test_read_only_drive_refuses_writes(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path, board: str
) -> None:
    image = workdir / "ro.img"
    image.write_bytes(os.urandom(4 * MiB))
    before = sha256_of(image, 4 * MiB)
    guest = boot(launch, guest_assets, [f"path={image},readonly=on"], f"evmm-blk-ro-{board}", board)
    assert guest.check("cat /sys/block/vda/ro").strip() == "1"  # VIRTIO_BLK_F_RO reached the driver
    # Reads work.
    assert guest_sha256(guest, "dd if=/dev/vda bs=1M count=4 2>/dev/null") == before
    # The guest refuses to write a read-only disk...
    out, status = guest.run("dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1")
    assert status != 0, out
    # ...and when it is told to try anyway (the block layer may then only warn and send the write), evmm
    # answers IOERR: whichever layer refuses, the image must not change.
    out, status = guest.run(
        "blockdev --setrw /dev/vda; dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync 2>&1"
    )
    assert status != 0, out
    poweroff(guest)
    assert sha256_of(image, 4 * MiB) == before


def test_two_drives_are_vda_and_vdb(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path, board: str
) -> None:
    a = sparse_image(workdir / "a.img", 8 * MiB)
    b = sparse_image(workdir / "b.img", 16 * MiB)
    guest = boot(
        launch, guest_assets, [f"path={a},id=disk-a", f"path={b},id=disk-b"], f"evmm-blk-two-{board}", board
    )
    disks = {}
    for name in ("vda", "vdb"):
        serial = guest.check(f"cat /sys/block/{name}/serial").strip()  # GET_ID
        disks[serial] = int(guest.check(f"cat /sys/block/{name}/size"))
    assert disks == {"disk-a": 8 * MiB // 512, "disk-b": 16 * MiB // 512}
    # Each disk is its own image.
    guest.check("echo on-vdb | dd of=/dev/vdb conv=sync,fsync 2>/dev/null")
    vdb = a if guest.check("cat /sys/block/vdb/serial").strip() == "disk-a" else b
    vda = b if vdb is a else a
    assert vdb.read_bytes()[:6] == b"on-vdb" and vda.read_bytes()[:6] == bytes(6)
    poweroff(guest)
