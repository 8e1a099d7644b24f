"""The boot vCPU's starting state, set directly instead of running firmware.

Two entry states:
- 64-bit Linux boot protocol (boot.rst "64-bit Boot Protocol"): long mode with paging, an identity map covering
  the kernel, zero page and command line, ``__BOOT_CS``-style flat segments, RSI = zero page.
- PVH (xen/include/public/arch-x86/hvm/start_info.h and docs/misc/pvh.pandoc): 32-bit protected mode, paging
  off, flat 4 GiB CS/DS, a TSS, EBX = hvm_start_info.
"""

from __future__ import annotations

import struct

from evmm.arch.x86 import layout
from evmm.kvm.types import DTable, Fpu, Regs, Segment, Sregs
from evmm.memory import GuestMemory

# CR0, CR4 and EFER bits (Intel SDM vol. 3A §2.5, §2.2.1).
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits (SDM vol. 3A §4.5): present, writable, and PS for a 2 MiB page in a PD.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7
IDENTITY_MAP_GIB = 4

# Descriptor "flags" as gdt_entry() takes them: type/S/DPL/P in bits 0-7, AVL/L/DB/G in bits 12-15
# (the descriptor's bits 40-47 and 52-55; SDM vol. 3A §3.4.5).
FLAGS_CODE64 = 0xA09B  # G, L, P, S, type 0xb (execute/read, accessed)
FLAGS_CODE32 = 0xC09B  # G, D/B, P, S, type 0xb
FLAGS_DATA = 0xC093  # G, D/B, P, S, type 0x3 (read/write, accessed)
FLAGS_TSS64 = 0x808B  # G, P, type 0xb (busy 64-bit TSS)
FLAGS_TSS32 = 0x008B  # P, type 0xb (busy 32-bit TSS)

SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_TSS = 0x18


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor (SDM vol. 3A Figure 3-8)."""
    return (
        ((base & 0xFF000000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
        | ((limit & 0x000F0000) << 32)
        | ((flags & 0x0000F0FF) << 40)
    )


def segment_from_gdt(entry: int, index: int) -> Segment:
    """The KVM segment register value that loading descriptor ``index`` would produce."""
    g = (entry >> 55) & 1
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    if g:
        limit = (limit << 12) | 0xFFF  # 4 KiB granularity: KVM wants the byte limit
    present = (entry >> 47) & 1
    return Segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=limit,
        selector=index * 8,
        type=(entry >> 40) & 0xF,
        present=present,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if present else 1,
    )


def long_mode_gdt() -> tuple[int, ...]:
    return (
        0,
        gdt_entry(FLAGS_CODE64, 0, 0xFFFFF),
        gdt_entry(FLAGS_DATA, 0, 0xFFFFF),
        gdt_entry(FLAGS_TSS64, 0, 0xFFFFF),
    )


def pvh_gdt() -> tuple[int, ...]:
    return (
        0,
        gdt_entry(FLAGS_CODE32, 0, 0xFFFFF),
        gdt_entry(FLAGS_DATA, 0, 0xFFFFF),
        gdt_entry(FLAGS_TSS32, 0, 0x67),
    )


def identity_page_tables() -> dict[int, bytes]:
    """PML4 -> PDPT -> 4 PDs of 2 MiB pages identity-mapping the first 4 GiB, as ``{gpa: page}``."""
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | PTE_P | PTE_RW).ljust(4096, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (layout.PD_ADDR + i * 4096) | PTE_P | PTE_RW) for i in range(IDENTITY_MAP_GIB)
    ).ljust(4096, b"\0")
    tables = {layout.PML4_ADDR: pml4, layout.PDPT_ADDR: pdpt}
    for gib in range(IDENTITY_MAP_GIB):
        pd = b"".join(
            struct.pack("<Q", ((gib << 30) | (i << 21)) | PTE_P | PTE_RW | PTE_PS) for i in range(512)
        )
        tables[layout.PD_ADDR + gib * 4096] = pd
    return tables


def write_gdt(mem: GuestMemory, gdt: tuple[int, ...]) -> None:
    mem.write(layout.GDT_ADDR, b"".join(struct.pack("<Q", e) for e in gdt))
    mem.write(
        layout.IDT_ADDR, bytes(8)
    )  # an empty IDT: the kernel installs its own before enabling interrupts


def _with_segments(sregs: Sregs, gdt: tuple[int, ...]) -> Sregs:
    code = segment_from_gdt(gdt[1], 1)
    data = segment_from_gdt(gdt[2], 2)
    tss = segment_from_gdt(gdt[3], 3)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.gdt = DTable(layout.GDT_ADDR, len(gdt) * 8 - 1)
    sregs.idt = DTable(layout.IDT_ADDR, 7)
    return sregs


def long_mode_sregs(sregs: Sregs) -> Sregs:
    """Long mode with paging on: CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CR3 -> identity map (SDM vol. 3A §9.8.5)."""
    sregs = _with_segments(sregs, long_mode_gdt())
    sregs.cr0 = (sregs.cr0 & ~(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA
    return sregs


def pvh_sregs(sregs: Sregs) -> Sregs:
    """32-bit protected mode, paging off, as the PVH ABI requires."""
    sregs = _with_segments(sregs, pvh_gdt())
    sregs.cr0 = (sregs.cr0 & ~(CR0_CD | CR0_NW | CR0_PG)) | CR0_PE | CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


def linux64_regs(entry: int) -> Regs:
    return Regs(
        rip=entry, rsp=layout.BOOT_STACK_TOP, rbp=layout.BOOT_STACK_TOP, rsi=layout.ZERO_PAGE_ADDR, rflags=0x2
    )


def pvh_regs(entry: int) -> Regs:
    return Regs(rip=entry, rbx=layout.PVH_INFO_ADDR, rflags=0x2)


def boot_fpu() -> Fpu:
    return Fpu()


# Local APIC LVT registers (SDM vol. 3A §11.5.1): LINT0 wired as ExtINT (the 8259's output) and LINT1 as NMI,
# the virtual-wire setup the MP spec and the MADT's LAPIC NMI entry describe.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(regs: bytearray, offset: int, mode: int) -> None:
    (value,) = struct.unpack_from("<I", regs, offset)
    struct.pack_into("<I", regs, offset, (value & ~0x700) | (mode << 8))


def configure_lint(lapic_regs: bytearray) -> bytearray:
    _set_delivery_mode(lapic_regs, APIC_LVT0, APIC_MODE_EXTINT)
    _set_delivery_mode(lapic_regs, APIC_LVT1, APIC_MODE_NMI)
    return lapic_regs
