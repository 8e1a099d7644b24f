"""CPUID for each vCPU: what KVM supports, with the fixups a VMM owes the guest.

Intel SDM vol. 2A "CPUID", AMD APM vol. 3 appendix E, and Documentation/virt/kvm/x86/cpuid.rst.  The topology
evmm presents: one socket, ``num_cpus`` cores, one thread per core, APIC ID = vCPU index.
"""

from __future__ import annotations

from evmm.kvm.types import CpuidEntry

KVM_CPUID_SIGNATURE = 0x40000000
KVM_SIGNATURE = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM\0\0\0" in EBX, ECX, EDX
KVM_CPUID_FEATURES = 0x40000001
_FLAG_SIGNIFICANT_INDEX = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

LEAF1_ECX_HYPERVISOR = 1 << 31  # "reserved for use by hypervisor to indicate guest status"
LEAF1_EDX_HTT = 1 << 28
AMD_80000001_ECX_CMP_LEGACY = 1 << 1

# Leaf 0xB/0x1F level types (SDM: "V2 Extended Topology Enumeration Leaf").
LEVEL_SMT = 1
LEVEL_CORE = 2


def _bits_for(n: int) -> int:
    """Width of an APIC-ID field that can number ``n`` items (SDM: "Find the number of bits")."""
    return max(n - 1, 0).bit_length()


def _is_amd(entries: list[CpuidEntry]) -> bool:
    for e in entries:
        if e.function == 0:
            return (e.ebx, e.edx, e.ecx) == (0x68747541, 0x69746E65, 0x444D4163)  # "AuthenticAMD"
    return False


def _topology_leaf(function: int, apic_id: int, num_cpus: int) -> list[CpuidEntry]:
    core_shift = _bits_for(num_cpus)
    return [
        CpuidEntry(function, 0, _FLAG_SIGNIFICANT_INDEX, 0, 1, (LEVEL_SMT << 8) | 0, apic_id),
        CpuidEntry(
            function, 1, _FLAG_SIGNIFICANT_INDEX, core_shift, num_cpus, (LEVEL_CORE << 8) | 1, apic_id
        ),
        CpuidEntry(function, 2, _FLAG_SIGNIFICANT_INDEX, 0, 0, 2, apic_id),  # level type 0: end of list
    ]


def vcpu_cpuid(supported: list[CpuidEntry], index: int, num_cpus: int) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``index`` of ``num_cpus``."""
    amd = _is_amd(supported)
    apic_id = index
    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    for e in supported:
        f = e.function
        if f == 1:
            ebx = (e.ebx & 0x0000FFFF) | (apic_id << 24) | (num_cpus << 16)
            ebx = (ebx & ~0xFF00) | (8 << 8)  # CLFLUSH line size in 8-byte units: 64 bytes
            edx = e.edx | LEAF1_EDX_HTT if num_cpus > 1 else e.edx & ~LEAF1_EDX_HTT
            out.append(e.with_regs(ebx=ebx, ecx=e.ecx | LEAF1_ECX_HYPERVISOR, edx=edx))
        elif f == 4 and not amd:
            # Deterministic cache parameters: EAX[31:26] = cores per package - 1; EAX[25:14] = logical CPUs
            # sharing this cache - 1 (the L3 is shared by all cores, lower levels are per core).
            level = (e.eax >> 5) & 7
            sharing = num_cpus - 1 if level >= 3 else 0
            eax = (e.eax & 0x3FFF) | (sharing << 14) | ((num_cpus - 1) << 26) if e.eax & 0x1F else e.eax
            out.append(e.with_regs(eax=eax))
        elif f in (0xB, 0x1F):
            if f not in topology_done:
                out.extend(_topology_leaf(f, apic_id, num_cpus))
                topology_done.add(f)
        elif f == 0x80000001 and amd:
            ecx = (
                e.ecx | AMD_80000001_ECX_CMP_LEGACY if num_cpus > 1 else e.ecx & ~AMD_80000001_ECX_CMP_LEGACY
            )
            out.append(e.with_regs(ecx=ecx))
        elif f == 0x80000008 and amd:
            # ECX[7:0] = cores - 1, ECX[15:12] = APIC-ID bits for the core number (AMD APM vol. 3, E.4.7).
            ecx = (e.ecx & ~0xF0FF) | (num_cpus - 1) | (_bits_for(num_cpus) << 12)
            out.append(e.with_regs(ecx=ecx))
        elif f == 0x8000001E and amd:
            out.append(e.with_regs(eax=apic_id, ebx=index & 0xFF, ecx=0))
        else:
            out.append(e)
    if not any(e.function == KVM_CPUID_SIGNATURE for e in out):
        out.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *KVM_SIGNATURE))
    else:
        out = [
            e.with_regs(
                eax=max(e.eax, KVM_CPUID_FEATURES),
                ebx=KVM_SIGNATURE[0],
                ecx=KVM_SIGNATURE[1],
                edx=KVM_SIGNATURE[2],
            )
            if e.function == KVM_CPUID_SIGNATURE
            else e
            for e in out
        ]
    return out
