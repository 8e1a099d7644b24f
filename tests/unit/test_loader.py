"""Kernel image parsing and initrd placement: bzImage and ELF (with and without the PVH note)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from evmm.arch.x86 import layout
from evmm.arch.x86.bootparams import E820Entry, E820Type
from evmm.arch.x86.loader import EntryKind, load_kernel, parse_kernel, place_initrd, read_image
from evmm.arch.x86.pvh import HVM_START_MAGIC, PvhParams, build_start_info
from evmm.errors import BootError
from evmm.memory import GuestMemory
from tests.unit.test_bootparams import fake_bzimage


def elf64(segments: list[tuple[int, bytes, int]], entry: int, notes: bytes | None = None) -> bytes:
    """A minimal ELF64 x86_64 executable with PT_LOAD segments (paddr, data, memsz) and an optional PT_NOTE."""
    phnum = len(segments) + (1 if notes is not None else 0)
    phoff = 64
    data_off = phoff + 56 * phnum
    ehdr = bytearray(64)
    ehdr[:4] = b"\x7fELF"
    ehdr[4], ehdr[5], ehdr[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", ehdr, 16, 2, 62, 1, entry, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = b""
    body = b""
    for paddr, data, memsz in segments:
        off = data_off + len(body)
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 5, off, 0xFFFFFFFF80000000 + paddr, paddr, len(data), memsz, 0x1000
        )
        body += data
    if notes is not None:
        off = data_off + len(body)
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(notes), len(notes), 4)
        body += notes
    return bytes(ehdr) + phdrs + body


def xen_note(ntype: int, desc: bytes) -> bytes:
    name = b"Xen\0"
    return struct.pack("<III", len(name), len(desc), ntype) + name + desc.ljust((len(desc) + 3) & ~3, b"\0")


def test_bzimage_loads_the_protected_mode_part_at_1mib_with_the_64bit_entry() -> None:
    img = fake_bzimage(payload=b"KERNEL" * 100)
    k = parse_kernel(img)
    assert k.kind is EntryKind.LINUX64
    assert k.entry == 0x100000 + 0x200
    assert k.segments[0].paddr == 0x100000
    assert k.segments[0].data == b"KERNEL" * 100
    # The decompressor may run at pref_address and needs init_size there.
    assert k.reserved_end == 0x1000000 + 0x2000000
    mem = GuestMemory.anonymous([(0, 128 << 20)])
    load_kernel(mem, k, "k")
    assert mem.read(0x100000, 6) == b"KERNEL"


def test_elf_with_pvh_note_enters_through_it() -> None:
    notes = xen_note(6, b"xen-3.0") + xen_note(18, struct.pack("<I", 0x1000ABC))
    img = elf64([(0x1000000, b"\xcc" * 64, 0x3000)], entry=0x1000000, notes=notes)
    k = parse_kernel(img)
    assert k.kind is EntryKind.PVH
    assert k.entry == 0x1000ABC
    assert k.reserved_end == 0x1003000
    mem = GuestMemory.anonymous([(0, 64 << 20)])
    mem.write(0x1000040, b"\x55" * 16)  # bss must be zeroed by the loader
    load_kernel(mem, k, "k")
    assert mem.read(0x1000000, 64) == b"\xcc" * 64
    assert mem.read(0x1000040, 16) == bytes(16)


def test_elf_without_pvh_note_uses_the_elf_entry() -> None:
    img = elf64([(0x1000000, b"\x90" * 16, 16)], entry=0x1000000)
    k = parse_kernel(img)
    assert k.kind is EntryKind.ELF64
    assert k.entry == 0x1000000


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\x7fELF\x01\x01" + bytes(100), "not a little-endian 64-bit"),
        (
            elf64([(0x1000000, b"x", 1)], 0)[:18] + b"\x28\x00" + elf64([(0x1000000, b"x", 1)], 0)[20:],
            "machine 40",
        ),
        (elf64([], 0x1000000), "nothing to load"),
    ],
    ids=["elf32", "wrong-machine", "empty"],
)
def test_bad_elf_files_are_refused_clearly(image: bytes, message: str) -> None:
    with pytest.raises(BootError, match=message):
        parse_kernel(image, "vmlinux")


def test_segment_outside_guest_memory_asks_for_more_memory() -> None:
    k = parse_kernel(elf64([(0x4000000, b"\x90", 0x1000)], 0x4000000))
    with pytest.raises(BootError, match="give the guest more --memory"):
        load_kernel(GuestMemory.anonymous([(0, 32 << 20)]), k, "vmlinux")


def test_initrd_goes_high_page_aligned_and_below_initrd_addr_max() -> None:
    k = parse_kernel(fake_bzimage())
    addr = place_initrd(256 << 20, 3 << 20 | 123, k, 256 << 20, "initrd")
    assert addr % 4096 == 0
    assert addr + (3 << 20 | 123) <= 256 << 20
    assert addr > (256 << 20) - (4 << 20)


def test_initrd_that_does_not_fit_names_a_memory_size() -> None:
    k = parse_kernel(fake_bzimage())
    with pytest.raises(BootError, match=r"use --memory \d+M"):
        place_initrd(64 << 20, 40 << 20, k, 64 << 20, "big.cpio")


def test_pvh_start_info_layout() -> None:
    e820 = (E820Entry(0, 0x9FC00, E820Type.RAM), E820Entry(0x100000, 0x1000000, E820Type.RAM))
    blob = build_start_info(PvhParams(layout.PVH_INFO_ADDR, 0x20000, e820, 0xE0000, 0x7000000, 0x5000))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, nmemmap = struct.unpack_from(
        "<IIIIQQQQI", blob, 0
    )
    assert (magic, version, flags, nr_modules) == (HVM_START_MAGIC, 1, 0, 1)
    assert (cmdline, rsdp, nmemmap) == (0x20000, 0xE0000, 2)
    assert modlist == layout.PVH_INFO_ADDR + 56
    assert struct.unpack_from("<QQ", blob, modlist - layout.PVH_INFO_ADDR) == (0x7000000, 0x5000)
    assert memmap == modlist + 32
    assert struct.unpack_from("<QQI", blob, memmap - layout.PVH_INFO_ADDR + 24) == (0x100000, 0x1000000, 1)


@pytest.mark.parametrize("kind", ["elf", "bzimage"])
def test_loading_from_the_file_puts_the_same_bytes_where_the_view_does(kind: str, tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096 + b"tail"  # over a MiB, not a whole number of pages
    if kind == "elf":
        img = elf64([(0x1000000, body, len(body) + 0x2000), (0x2000000, b"second", 6)], entry=0x1000000)
    else:
        img = fake_bzimage(payload=body)
    path = tmp_path / "kernel"
    path.write_bytes(img)
    k = parse_kernel(read_image(path, "kernel"))
    by_view, by_file = GuestMemory.anonymous([(0, 64 << 20)]), GuestMemory.anonymous([(0, 64 << 20)])
    by_file.write(0x1000000 + len(body), b"\x55" * 16)  # bss is zeroed either way
    load_kernel(by_view, k, "k")
    with path.open("rb") as f:
        load_kernel(by_file, k, "k", f.fileno())
    for seg in k.segments:
        assert by_file.read(seg.paddr, seg.memsz) == by_view.read(seg.paddr, seg.memsz)
        assert by_file.read(seg.paddr, len(seg.data)) == bytes(seg.data)
    # A file cut short under us: one line naming it, not a half-loaded guest.
    with path.open("r+b") as f:
        f.truncate(len(img) - 100)
        with pytest.raises(BootError, match=r"^k: the file ended \d+ bytes early"):
            load_kernel(by_file, k, "k", f.fileno())
