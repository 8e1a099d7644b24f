"""The cpio newc writer: byte layout, parents, device nodes, and agreement with cpio(1)."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from evmm.assets.initramfs import Archive, read_cpio


def test_header_layout_matches_the_newc_format() -> None:
    a = Archive()
    a.file("init", b"#!/bin/sh\n", 0o755)
    blob = a.to_cpio()
    # magic, then 13 eight-digit hex fields; name "init\0" padded so the data starts 4-aligned.
    assert blob[:6] == b"070701"
    fields = [int(blob[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == stat.S_IFREG | 0o755
    assert fields[6] == len(b"#!/bin/sh\n")
    assert fields[11] == len(b"init\0")
    assert blob[110:115] == b"init\0"
    assert blob[116:126] == b"#!/bin/sh\n"  # 110 + 5 = 115, padded to 116
    assert blob.endswith(b"TRAILER!!!\0" + b"\0" * (-(110 + 11) % 4))
    assert len(blob) % 4 == 0


def test_parents_are_created_and_entries_round_trip() -> None:
    a = Archive()
    a.file("lib/modules/6.1/kernel/x.ko", b"\x7fELF", 0o644)
    a.symlink("bin/sh", "/bin/busybox")
    a.char_device("dev/console", 5, 1)
    entries = {e.path: e for e in read_cpio(a.to_cpio())}
    assert list(entries) == ["lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel",
                             "lib/modules/6.1/kernel/x.ko", "bin", "bin/sh", "dev", "dev/console"]  # fmt: skip
    assert stat.S_ISDIR(entries["lib/modules"].mode)
    assert entries["bin/sh"].data == b"/bin/busybox" and stat.S_ISLNK(entries["bin/sh"].mode)
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)


def test_same_inputs_give_the_same_bytes() -> None:
    def build() -> bytes:
        a = Archive()
        a.file("etc/x", b"1")
        return a.to_gzip()

    assert build() == build()
    assert read_cpio(gzip.decompress(build()))[1].data == b"1"


def test_duplicates_and_escapes_are_refused() -> None:
    a = Archive()
    a.file("etc/x", b"1")
    with pytest.raises(ValueError, match="added twice"):
        a.file("/etc/x", b"2")
    with pytest.raises(ValueError, match=r"\.\."):
        a.file("../etc/passwd", b"")
    a.directory("etc")  # a directory may be named again


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) is not installed")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    a = Archive()
    a.file("a/b.txt", b"hello\n", 0o600)
    a.symlink("a/link", "b.txt")
    (tmp_path / "x.cpio").write_bytes(a.to_cpio())
    subprocess.run(["cpio", "-idm", "--quiet", "-F", str(tmp_path / "x.cpio")], cwd=tmp_path, check=True)
    assert (tmp_path / "a" / "b.txt").read_text() == "hello\n"
    assert (tmp_path / "a" / "link").readlink() == Path("b.txt")
