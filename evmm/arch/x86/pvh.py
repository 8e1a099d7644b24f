"""The PVH boot ABI's ``struct hvm_start_info`` (xen/include/public/arch-x86/hvm/start_info.h, version 1).

Linux's PVH entry (arch/x86/platform/pvh/enlighten.c) reads the command line, the initrd (first module), the
RSDP and the memory map from it, and builds its own zero page.
"""

from __future__ import annotations

import struct

from evmm.arch.x86.bootparams import E820Entry
from evmm.record import record

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24


@record(frozen=True)
class PvhParams:
    base: int  # where start_info goes; the module list and memory map follow it
    cmdline_addr: int
    e820: tuple[E820Entry, ...]
    rsdp_addr: int = 0
    initrd_addr: int = 0
    initrd_size: int = 0


def build_start_info(p: PvhParams) -> bytes:
    nr_modules = 1 if p.initrd_size else 0
    modlist_addr = p.base + HVM_START_INFO_SIZE
    memmap_addr = modlist_addr + nr_modules * MODLIST_ENTRY_SIZE
    info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,  # version 1 adds the memory map
        0,  # flags
        nr_modules,
        modlist_addr if nr_modules else 0,
        p.cmdline_addr,
        p.rsdp_addr,
        memmap_addr,
        len(p.e820),
        0,
    )
    assert len(info) == HVM_START_INFO_SIZE
    modules = struct.pack("<QQQQ", p.initrd_addr, p.initrd_size, 0, 0) if nr_modules else b""
    # hvm_memmap_table_entry uses the e820 type values (XEN_HVM_MEMMAP_TYPE_* match E820_TYPE_*).
    memmap = b"".join(struct.pack("<QQII", e.addr, e.size, int(e.type), 0) for e in p.e820)
    return info + modules + memmap
