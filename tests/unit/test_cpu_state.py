"""Boot vCPU state: GDT descriptors, the segments KVM gets, identity page tables, CPUID fixups, MSRs."""

from __future__ import annotations

import struct

from evmm.arch.x86 import cpu, layout
from evmm.arch.x86.cpuid import KVM_SIGNATURE, vcpu_cpuid
from evmm.arch.x86.irqroute import pc_gsi_routes
from evmm.arch.x86.msrs import MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE, boot_msrs
from evmm.kvm import CpuidEntry, Sregs
from evmm.kvm.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER


def test_gdt_entries_match_the_sdm_encoding() -> None:
    # Flat 64-bit code: base 0, limit 0xfffff, G=1, L=1, P=1, S=1, type 0xb -> 0x00af9b000000ffff.
    assert cpu.gdt_entry(cpu.FLAGS_CODE64, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    # Flat data: G=1, D/B=1, P=1, S=1, type 3 -> 0x00cf93000000ffff.
    assert cpu.gdt_entry(cpu.FLAGS_DATA, 0, 0xFFFFF) == 0x00CF93000000FFFF
    assert cpu.gdt_entry(0x0093, 0x12345678, 0xABCDE) == 0x120A93345678BCDE


def test_segments_decoded_from_descriptors() -> None:
    code = cpu.segment_from_gdt(cpu.long_mode_gdt()[1], 1)
    assert (code.selector, code.type, code.l, code.db, code.s, code.present, code.g) == (
        8,
        0xB,
        1,
        0,
        1,
        1,
        1,
    )
    assert code.limit == 0xFFFFFFFF  # 4 KiB granularity scaled to bytes
    data = cpu.segment_from_gdt(cpu.long_mode_gdt()[2], 2)
    assert (data.selector, data.type, data.db, data.l) == (0x10, 3, 1, 0)
    tss = cpu.segment_from_gdt(cpu.pvh_gdt()[3], 3)
    assert (tss.selector, tss.type, tss.s, tss.limit, tss.g) == (0x18, 0xB, 0, 0x67, 0)
    null = cpu.segment_from_gdt(0, 0)
    assert null.unusable == 1


def test_long_mode_state() -> None:
    s = cpu.long_mode_sregs(Sregs(cr0=0x60000010))
    assert s.cr0 & cpu.CR0_PE and s.cr0 & cpu.CR0_PG
    assert not s.cr0 & (cpu.CR0_CD | cpu.CR0_NW)
    assert s.cr3 == layout.PML4_ADDR
    assert s.cr4 & cpu.CR4_PAE
    assert s.efer & cpu.EFER_LME and s.efer & cpu.EFER_LMA
    assert s.cs.l == 1 and s.cs.selector == 8
    assert s.gdt.base == layout.GDT_ADDR and s.gdt.limit == 31
    regs = cpu.linux64_regs(0x100200)
    assert (regs.rip, regs.rsi, regs.rflags) == (0x100200, layout.ZERO_PAGE_ADDR, 2)


def test_pvh_state_is_32_bit_protected_mode_without_paging() -> None:
    s = cpu.pvh_sregs(Sregs(cr0=0x60000010, cr4=0x20, efer=0x500))
    assert s.cr0 & cpu.CR0_PE and not s.cr0 & cpu.CR0_PG
    assert s.cr4 == 0 and s.efer == 0
    assert s.cs.db == 1 and s.cs.l == 0 and s.cs.limit == 0xFFFFFFFF
    assert cpu.pvh_regs(0x1000ABC).rbx == layout.PVH_INFO_ADDR


def test_identity_map_covers_4gib_with_2mib_pages() -> None:
    t = cpu.identity_page_tables()
    pml4 = struct.unpack("<512Q", t[layout.PML4_ADDR])
    assert pml4[0] == layout.PDPT_ADDR | 3 and not any(pml4[1:])
    pdpt = struct.unpack("<512Q", t[layout.PDPT_ADDR])
    assert pdpt[:4] == tuple((layout.PD_ADDR + i * 4096) | 3 for i in range(4))
    pd3 = struct.unpack("<512Q", t[layout.PD_ADDR + 3 * 4096])
    assert pd3[511] == ((3 << 30) + (511 << 21)) | 0x83  # last 2 MiB below 4 GiB, present|rw|ps
    assert max(t) + 4096 <= layout.CMDLINE_ADDR  # tables don't run into the command line


def test_lint_wiring() -> None:
    regs = bytearray(1024)
    struct.pack_into("<I", regs, 0x350, 0x10700)  # masked, some mode
    cpu.configure_lint(regs)
    assert (struct.unpack_from("<I", regs, 0x350)[0] >> 8) & 7 == 7  # ExtINT
    assert (struct.unpack_from("<I", regs, 0x360)[0] >> 8) & 7 == 4  # NMI
    assert struct.unpack_from("<I", regs, 0x350)[0] & 0x10000  # mask bit untouched


INTEL = [
    CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
    CpuidEntry(1, 0, 0, 0x306A9, 0x00010800, 0x80000000 - 1, 0x1FABFBFF),
    CpuidEntry(4, 0, 1, 0x1C004121, 0x01C0003F, 0x3F, 0),
    CpuidEntry(4, 3, 1, 0x1C03C163, 0x02C0003F, 0x1FFF, 6),
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 5),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, 0, 0, 0),
]


def test_cpuid_leaf1_apic_id_and_hypervisor_bit() -> None:
    out = {(e.function, e.index): e for e in vcpu_cpuid(INTEL, 3, 4)}
    leaf1 = out[(1, 0)]
    assert leaf1.ebx >> 24 == 3
    assert (leaf1.ebx >> 16) & 0xFF == 4
    assert (leaf1.ebx >> 8) & 0xFF == 8
    assert leaf1.ecx & (1 << 31)
    assert leaf1.edx & (1 << 28)


def test_cpuid_topology_leaves() -> None:
    out = {(e.function, e.index): e for e in vcpu_cpuid(INTEL, 5, 6)}
    smt, core, end = out[(0xB, 0)], out[(0xB, 1)], out[(0xB, 2)]
    assert (smt.eax, smt.ebx, (smt.ecx >> 8) & 0xFF, smt.edx) == (0, 1, 1, 5)
    assert (core.eax, core.ebx, (core.ecx >> 8) & 0xFF, core.edx) == (3, 6, 2, 5)
    assert (end.ecx >> 8) & 0xFF == 0
    l1, l3 = out[(4, 0)], out[(4, 3)]
    assert l1.eax >> 26 == 5 and (l1.eax >> 14) & 0xFFF == 0
    assert l3.eax >> 26 == 5 and (l3.eax >> 14) & 0xFFF == 5


def test_cpuid_kvm_signature() -> None:
    out = {e.function: e for e in vcpu_cpuid(INTEL, 0, 1)}
    sig = out[0x40000000]
    assert (sig.ebx, sig.ecx, sig.edx) == KVM_SIGNATURE
    assert struct.pack("<III", *KVM_SIGNATURE) == b"KVMKVMKVM\0\0\0"
    assert not out[1].edx & (1 << 28)  # one CPU: no HTT


def test_boot_msrs() -> None:
    msrs = dict(boot_msrs())
    assert msrs[MSR_MTRR_DEF_TYPE] == (1 << 11) | 6
    assert msrs[MSR_IA32_MISC_ENABLE] & 1


def test_gsi_routing_matches_the_madt_override() -> None:
    routes = pc_gsi_routes()
    ioapic = {r.gsi: r.pin for r in routes if r.chip == IRQCHIP_IOAPIC}
    assert ioapic[0] == 2 and 2 not in ioapic
    assert all(ioapic[g] == g for g in range(3, 24))
    pic = {r.gsi for r in routes if r.chip == IRQCHIP_PIC_MASTER}
    assert pic == {0, 1, 3, 4, 5, 6, 7}
