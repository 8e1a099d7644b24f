"""Putting a Linux kernel into guest memory and the boot vCPU into its entry state (x86_64).

Ties together the image loader, the zero page or PVH start info, the e820 map, page tables, GDT and the CPU
state.  Boot code only runs before the first KVM_RUN.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from evmm.arch.x86 import cpu, layout
from evmm.arch.x86.bootparams import ZeroPageParams, build_zero_page
from evmm.arch.x86.cpuid import vcpu_cpuid
from evmm.arch.x86.e820 import e820_map
from evmm.arch.x86.loader import EntryKind, load_file, load_kernel, parse_kernel, place_initrd, read_image
from evmm.arch.x86.msrs import boot_msrs
from evmm.arch.x86.pvh import PvhParams, build_start_info
from evmm.errors import BootError
from evmm.kvm import CpuidEntry
from evmm.memory import GuestMemory
from evmm.record import record

if TYPE_CHECKING:
    from evmm.kvm import Vcpu


@record(frozen=True)
class BootPlan:
    kind: EntryKind
    entry: int
    cmdline: str
    initrd_addr: int
    initrd_size: int


def load_linux(
    mem: GuestMemory,
    kernel_path: Path,
    initrd_path: Path | None,
    cmdline: str,
    rsdp_addr: int,
) -> BootPlan:
    name = str(kernel_path)
    image = parse_kernel(read_image(kernel_path, "kernel"), name)
    cmd = cmdline.encode()
    if len(cmd) > image.cmdline_max:
        raise BootError(
            f"kernel command line is {len(cmd)} bytes; {name} accepts at most {image.cmdline_max}"
        )
    mem_size = mem.size
    low_end = mem.regions[0].end
    # The parser read the headers through a mapping; the bulk goes from the file into guest RAM.
    with _open(kernel_path, "kernel") as f:
        load_kernel(mem, image, name, f.fileno())

    initrd_addr = initrd_size = 0
    if initrd_path is not None:
        with _open(initrd_path, "initrd") as f:
            initrd_size = os.fstat(f.fileno()).st_size
            if initrd_size == 0:
                raise BootError(f"initrd {initrd_path}: file is empty")
            initrd_addr = place_initrd(low_end, initrd_size, image, mem_size, str(initrd_path))
            load_file(mem, initrd_addr, f.fileno(), 0, initrd_size, str(initrd_path))

    e820 = e820_map(mem_size)
    mem.write(layout.CMDLINE_ADDR, cmd + b"\0")
    if image.kind is EntryKind.PVH:
        cpu.write_gdt(mem, cpu.pvh_gdt())
        info = build_start_info(
            PvhParams(layout.PVH_INFO_ADDR, layout.CMDLINE_ADDR, e820, rsdp_addr, initrd_addr, initrd_size)
        )
        mem.write(layout.PVH_INFO_ADDR, info)
    else:
        cpu.write_gdt(mem, cpu.long_mode_gdt())
        for gpa, page in cpu.identity_page_tables().items():
            mem.write(gpa, page)
        zp = ZeroPageParams(layout.CMDLINE_ADDR, e820, initrd_addr, initrd_size, rsdp_addr)
        mem.write(layout.ZERO_PAGE_ADDR, build_zero_page(zp, image.header))
    return BootPlan(image.kind, image.entry, cmdline, initrd_addr, initrd_size)


def _open(path: Path, what: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise BootError(f"{what} {path}: {e.strerror}") from None


def setup_vcpu(vcpu: Vcpu, supported_cpuid: list[CpuidEntry], num_cpus: int) -> None:
    """State every vCPU needs: CPUID, MSRs, FPU, LAPIC virtual-wire LINT0/LINT1."""
    vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, vcpu.index, num_cpus))
    vcpu.set_msrs(boot_msrs())
    vcpu.set_fpu(cpu.boot_fpu())
    vcpu.set_lapic(cpu.configure_lint(vcpu.get_lapic()))


def setup_boot_vcpu(vcpu: Vcpu, plan: BootPlan) -> None:
    """The BSP starts at the kernel entry; APs wait for the kernel's INIT/SIPI in KVM's in-kernel LAPIC."""
    sregs = vcpu.get_sregs()
    if plan.kind is EntryKind.PVH:
        vcpu.set_sregs(cpu.pvh_sregs(sregs))
        vcpu.set_regs(cpu.pvh_regs(plan.entry))
    else:
        vcpu.set_sregs(cpu.long_mode_sregs(sregs))
        vcpu.set_regs(cpu.linux64_regs(plan.entry))
