"""Kernel and initrd loading: a bzImage (Linux x86 boot protocol) or an uncompressed ELF vmlinux.

Parsing (``parse_kernel``) is pure and separate from copying into guest memory (``load_kernel``), so both
image formats are unit-tested byte for byte without a VM.
"""

from __future__ import annotations

import mmap
import os
import struct
from enum import Enum
from pathlib import Path

from evmm.arch.x86 import layout
from evmm.arch.x86.bootparams import ENTRY_64_OFFSET, SetupHeader, parse_setup_header
from evmm.errors import BootError
from evmm.memory import GuestMemory
from evmm.record import record

ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 62
_PT_LOAD = 1
_PT_NOTE = 4
# Xen's PVH entry note (xen/include/public/elfnote.h): a 32-bit protected-mode entry point that takes a
# struct hvm_start_info in EBX.  Linux built with CONFIG_PVH carries it; it skips the decompressor entirely.
XEN_ELFNOTE_PHYS32_ENTRY = 18
# x86 COMMAND_LINE_SIZE; an ELF kernel has no setup header to tell us its own limit.
ELF_CMDLINE_MAX = 2048
# An ELF image gives no initrd_addr_max either; stay below 2 GiB as boot.rst's modern default does.
ELF_INITRD_ADDR_MAX = 0x7FFFFFFF


class EntryKind(Enum):
    LINUX64 = "linux64"  # 64-bit boot protocol: long mode, RSI -> zero page
    PVH = "pvh"  # 32-bit protected mode, paging off, EBX -> hvm_start_info
    ELF64 = "elf64"  # ELF entry point, entered like LINUX64


# Images are parsed and loaded through memoryviews of a read-only mapping of the file: a 50 MB vmlinux is
# then copied once, from the page cache into guest RAM, instead of read into a bytes object, sliced into
# segment copies and copied again (~60 ms of evmm's start-up, measured natively).
Image = bytes | memoryview


@record(frozen=True)
class Segment:
    paddr: int
    data: Image
    memsz: int
    offset: int = 0  # where ``data`` starts in the image file


@record(frozen=True)
class KernelImage:
    kind: EntryKind
    entry: int
    segments: tuple[Segment, ...]
    header: SetupHeader | None
    cmdline_max: int  # longest command line, without the NUL
    initrd_addr_max: int
    reserved_end: int  # guest-physical end of what the kernel may use while starting (decompression too)


def parse_kernel(image: Image, name: str = "kernel") -> KernelImage:
    if image[:4] == ELF_MAGIC:
        return _parse_elf(image, name)
    return _parse_bzimage(image, name)


def _parse_bzimage(image: Image, name: str) -> KernelImage:
    hdr = parse_setup_header(image, name)
    payload = image[hdr.setup_size :]
    load = layout.HIMEM_START
    # The decompressor may move the kernel to pref_address and needs init_size bytes there (boot.rst, init_size:
    # "the amount of linear contiguous memory starting at the kernel runtime start address").
    runtime_start = max(load, hdr.pref_address if hdr.relocatable else load)
    reserved_end = max(load + len(payload), runtime_start + hdr.init_size)
    return KernelImage(
        kind=EntryKind.LINUX64,
        entry=load + ENTRY_64_OFFSET,
        segments=(Segment(load, payload, len(payload), hdr.setup_size),),
        header=hdr,
        cmdline_max=min(hdr.cmdline_size, layout.CMDLINE_MAX - 1) if hdr.cmdline_size else 255,
        initrd_addr_max=hdr.initrd_addr_max or 0x37FFFFFF,
        reserved_end=reserved_end,
    )


def _parse_elf(image: Image, name: str) -> KernelImage:
    if len(image) < 64 or image[4] != 2 or image[5] != 1:
        raise BootError(f"{name}: an ELF file, but not a little-endian 64-bit one")
    (e_machine,) = struct.unpack_from("<H", image, 18)
    if e_machine != _EM_X86_64:
        raise BootError(f"{name}: an ELF file for machine {e_machine}, not x86_64")
    e_entry, e_phoff = struct.unpack_from("<QQ", image, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 54)
    if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(image):
        raise BootError(f"{name}: truncated or malformed ELF program headers")
    segments = []
    pvh_entry: int | None = None
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", image, e_phoff + i * e_phentsize
        )
        if p_offset + p_filesz > len(image) or (p_filesz > p_memsz and p_type == _PT_LOAD):
            raise BootError(f"{name}: ELF segment {i} lies outside the file")
        if p_type == _PT_LOAD and p_memsz:
            segments.append(Segment(p_paddr, image[p_offset : p_offset + p_filesz], p_memsz, p_offset))
        elif p_type == _PT_NOTE:
            found = _find_pvh_entry(image[p_offset : p_offset + p_filesz])
            pvh_entry = pvh_entry if found is None else found
    if not segments:
        raise BootError(f"{name}: ELF file has nothing to load")
    end = max(s.paddr + s.memsz for s in segments)
    if pvh_entry is not None:
        kind, entry = EntryKind.PVH, pvh_entry
    else:
        kind, entry = EntryKind.ELF64, e_entry
    return KernelImage(kind, entry, tuple(segments), None, ELF_CMDLINE_MAX - 1, ELF_INITRD_ADDR_MAX, end)


def _find_pvh_entry(notes: Image) -> int | None:
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        name_start = off + 12
        desc_start = name_start + ((namesz + 3) & ~3)
        nxt = desc_start + ((descsz + 3) & ~3)
        if nxt > len(notes):
            return None
        if (
            ntype == XEN_ELFNOTE_PHYS32_ENTRY
            and bytes(notes[name_start : name_start + namesz]).rstrip(b"\0") == b"Xen"
        ):
            width = 8 if descsz >= 8 else 4
            return int.from_bytes(notes[desc_start : desc_start + width], "little")
        off = nxt
    return None


def read_image(path: Path, what: str) -> memoryview:
    """The file's bytes, as a view of a private read-only mapping (or of a copy where it cannot be mapped)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BootError(f"{what} {path}: file is empty")
            try:
                return memoryview(mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ))
            except (OSError, ValueError):  # not mappable (a pipe, some file systems): read it
                data = f.read()
    except FileNotFoundError:
        raise BootError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise BootError(f"{what} {path}: {e.strerror}") from None
    if not data:
        raise BootError(f"{what} {path}: file is empty")
    return memoryview(data)


def load_kernel(mem: GuestMemory, kernel: KernelImage, name: str, fd: int | None = None) -> None:
    """Copy the segments into guest memory; from the image file ``fd`` itself when given (``load_file``)."""
    for seg in kernel.segments:
        if not mem.contains(seg.paddr, seg.memsz):
            raise BootError(
                f"{name}: needs guest memory up to {(seg.paddr + seg.memsz) >> 20} MiB; give the guest more --memory"
            )
        if fd is None:
            mem.write(seg.paddr, seg.data)
        else:
            load_file(mem, seg.paddr, fd, seg.offset, len(seg.data), name)
        if seg.memsz > len(seg.data):
            mem.fill(seg.paddr + len(seg.data), seg.memsz - len(seg.data))


def load_file(mem: GuestMemory, gpa: int, fd: int, offset: int, length: int, name: str) -> None:
    """Read ``length`` bytes of file ``fd`` at ``offset`` into guest memory at ``gpa``.

    preadv(2) straight into guest RAM: the kernel copies from the page cache and takes the guest pages'
    first-touch faults itself, where copying from a mapping of the file faults on both sides in user space
    (a 46 MiB vmlinux: 135 ms against 348 ms natively, 43 ms with the guest RAM on huge pages).
    """
    view = mem.view(gpa, length)
    try:
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise BootError(f"{name}: the file ended {length - done} bytes early (did it change?)")
            done += n
    except OSError as e:
        raise BootError(f"{name}: {e.strerror}") from None
    finally:
        view.release()


def place_initrd(low_ram_end: int, size: int, kernel: KernelImage, mem_size: int, name: str) -> int:
    """Highest page-aligned address for the initrd below ``initrd_addr_max`` and RAM's end (boot.rst advice)."""
    top = min(low_ram_end, kernel.initrd_addr_max + 1)
    addr = (top - size) & ~0xFFF
    if addr < kernel.reserved_end:
        need = (kernel.reserved_end + size + (1 << 20) - 1) >> 20
        raise BootError(
            f"initrd {name} ({size >> 20} MiB) does not fit beside the kernel in {mem_size >> 20} MiB of guest "
            f"memory; use --memory {max(need + 16, 64)}M or more"
        )
    return addr
