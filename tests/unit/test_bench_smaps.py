"""evmm bench: the VMM's overhead from /proc/PID/smaps (guest RAM found by its mapping's size)."""

from __future__ import annotations

import mmap
import os

import pytest

from evmm.bench import smaps

MiB = 1 << 20

# Shaped like a QEMU process's smaps (fields trimmed): a binary, the heap, the 128 MiB guest RAM block and a
# library; the RAM block is followed by QEMU's guard page.
SAMPLE = """\
55d0c4a00000-55d0c4f00000 r-xp 00000000 08:01 1234                       /usr/bin/qemu-system-x86_64
Size:               5120 kB
Rss:                3000 kB
Pss:                3000 kB
55d0c6000000-55d0c7000000 rw-p 00000000 00:00 0                          [heap]
Size:              16384 kB
Rss:               12000 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               40000 kB
Anonymous:         40000 kB
7f0008000000-7f0008001000 ---p 00000000 00:00 0
Size:                  4 kB
Rss:                   0 kB
7f1000000000-7f1000100000 r-xp 00000000 08:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1024 kB
Rss:                 800 kB
VmFlags: rd ex mr mw me
"""


def test_parse_reads_each_mapping_and_its_rss() -> None:
    maps = smaps.parse(SAMPLE)
    assert len(maps) == 5
    assert maps[0].path == "/usr/bin/qemu-system-x86_64" and maps[0].rss == 3000 * 1024
    assert maps[2].anonymous and maps[2].size == 128 * MiB and maps[2].perms == "rw-p"
    assert maps[3].perms == "---p"
    assert maps[4].rss == 800 * 1024


def test_guest_ram_is_the_mapping_of_its_size_and_the_rest_is_overhead() -> None:
    u = smaps.usage(smaps.parse(SAMPLE), [128 * MiB])
    assert u.guest == 40000 * 1024
    assert u.total == (3000 + 12000 + 40000 + 800) * 1024
    assert u.overhead == (3000 + 12000 + 800) * 1024


def test_a_missing_guest_mapping_is_an_error_not_a_guess() -> None:
    with pytest.raises(smaps.SmapsError, match="1024 MiB"):
        smaps.usage(smaps.parse(SAMPLE), [1024 * MiB])


def test_a_padded_ram_block_still_counts_but_a_file_mapping_never_does() -> None:
    padded = SAMPLE.replace("7f0000000000-7f0008000000", "7f0000000000-7f0008200000")  # +2 MiB
    assert smaps.usage(smaps.parse(padded), [128 * MiB]).guest == 40000 * 1024
    as_file = SAMPLE.replace(
        "7f0008000000 rw-p 00000000 00:00 0\n", "7f0008000000 rw-s 0 00:05 7 /dev/shm/ram\n"
    )
    with pytest.raises(smaps.SmapsError):
        smaps.usage(smaps.parse(as_file), [128 * MiB])


def test_reads_this_process() -> None:
    # A 77 MiB anonymous mapping with 8 MiB touched: found by size, with 8 MiB resident.  An odd size no
    # other mapping of this process has, and a VMA of its own: an anonymous mmap merges with a neighbouring
    # anonymous mapping, whose pages then counted too (9.5 MiB resident in a CI run); madvise splits the
    # range back out (its flags now differ from any neighbour's).
    size = 77 * MiB
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    try:
        for off in range(0, 8 * MiB, mmap.PAGESIZE):
            buf[off] = 1
        u = smaps.read(os.getpid(), [size])
        assert 8 * MiB <= u.guest < 9 * MiB
        assert u.overhead > 0
        assert smaps.peak_rss(os.getpid()) >= u.total - size
    finally:
        buf.close()
