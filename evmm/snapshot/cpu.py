"""KVM state records to msgpack-able maps and back, and the CPU-feature check a restore starts with.

A guest uses the CPU features its CPUID offered when it booted (Linux picks its memcpy, its crypto, its
XSAVE layout once): restored on a host whose KVM cannot offer one of them, it would die at the first such
instruction, long after the restore "worked".  So ``check_cpu`` refuses first, naming what is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from evmm.kvm.state import VcpuState, VmState
from evmm.kvm.types import SEGMENT_NAMES, CpuidEntry, DTable, Regs, Segment, Sregs
from evmm.snapshot.format import Fields, SnapshotError

# (leaf, subleaf, register) -> names of the feature bits most worth naming (Intel SDM vol. 2A "CPUID",
# AMD APM vol. 3 appendix E); any other missing bit is named by its position.
FEATURE_NAMES: dict[tuple[int, int, str], dict[int, str]] = {
    (1, 0, "ecx"): {
        0: "sse3", 1: "pclmulqdq", 9: "ssse3", 12: "fma", 13: "cx16", 19: "sse4_1", 20: "sse4_2",
        21: "x2apic", 22: "movbe", 23: "popcnt", 24: "tsc_deadline_timer", 25: "aes", 26: "xsave",
        28: "avx", 29: "f16c", 30: "rdrand",
    },
    (1, 0, "edx"): {0: "fpu", 4: "tsc", 5: "msr", 15: "cmov", 19: "clflush", 23: "mmx", 24: "fxsr",
                    25: "sse", 26: "sse2"},
    (7, 0, "ebx"): {
        0: "fsgsbase", 3: "bmi1", 5: "avx2", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid",
        16: "avx512f", 17: "avx512dq", 18: "rdseed", 19: "adx", 20: "smap", 23: "clflushopt", 24: "clwb",
        28: "avx512cd", 29: "sha_ni", 30: "avx512bw", 31: "avx512vl",
    },
    (7, 0, "ecx"): {1: "avx512vbmi", 2: "umip", 3: "pku", 8: "gfni", 9: "vaes", 10: "vpclmulqdq",
                    22: "rdpid"},
    (7, 0, "edx"): {4: "fsrm", 10: "md_clear", 26: "spec_ctrl", 27: "intel_stibp", 29: "arch_capabilities",
                    31: "spec_ctrl_ssbd"},
    (7, 1, "eax"): {4: "avx_vnni", 5: "avx512_bf16"},
    (0xD, 1, "eax"): {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"},
    (0x80000001, 0, "ecx"): {0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch"},
    (0x80000001, 0, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}  # fmt: skip
# Bits that are not features the host offers but state KVM or evmm writes into the guest's CPUID: OSXSAVE and
# OSPKE follow the guest's CR4, APIC the APIC-base MSR; HYPERVISOR, HTT and CMP_LEGACY are evmm's own.
DYNAMIC_BITS: dict[tuple[int, int, str], int] = {
    (1, 0, "ecx"): (1 << 27) | (1 << 31),
    (1, 0, "edx"): (1 << 9) | (1 << 28),
    (7, 0, "ecx"): 1 << 4,
    (0x80000001, 0, "ecx"): 1 << 1,
}


def _vendor(entries: tuple[CpuidEntry, ...] | list[CpuidEntry]) -> str:
    for e in entries:
        if e.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode("ascii", "replace")
    return "unknown"


def missing_features(used: tuple[CpuidEntry, ...], supported: list[CpuidEntry]) -> list[str]:
    """The features the guest's CPUID ``used`` offered that this host's KVM ``supported`` does not."""
    host = {(e.function, e.index): e for e in supported}
    missing: list[str] = []
    for e in used:
        for reg in ("eax", "ebx", "ecx", "edx"):
            key = (e.function, e.index, reg)
            if key not in FEATURE_NAMES:
                continue
            have = host.get((e.function, e.index))
            host_bits = getattr(have, reg) if have is not None else 0
            lacking = getattr(e, reg) & ~host_bits & ~DYNAMIC_BITS.get(key, 0)
            for bit in range(32):
                if lacking >> bit & 1:
                    name = FEATURE_NAMES[key].get(bit)
                    missing.append(name or f"CPUID {e.function:#x}.{e.index} {reg.upper()} bit {bit}")
    return missing


def check_cpu(where: str, used: tuple[CpuidEntry, ...], supported: list[CpuidEntry]) -> None:
    """One ``SnapshotError`` line when this host cannot run a guest that booted with CPUID ``used``
    (none: a machine whose vCPUs were never given a CPUID table, such as the kvm tier's tiny guests)."""
    if not used:
        return
    theirs, ours = _vendor(used), _vendor(supported)
    if theirs != ours:
        raise SnapshotError(f"{where}: made on a {theirs} CPU; this host's is {ours}")
    missing = missing_features(used, supported)
    if missing:
        raise SnapshotError(
            f"{where}: the guest uses CPU features this host's KVM lacks: {', '.join(missing)}"
        )


# ---- records <-> maps ----------------------------------------------------------------------------------------


def _plain(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _segment(f: Fields) -> Segment:
    return Segment(**{name.name: f.integer(name.name) for name in dataclasses.fields(Segment)})


_SREGS_SCALARS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


def _sregs(f: Fields) -> Sregs:
    out = Sregs(
        gdt=DTable(f.map("gdt").integer("base"), f.map("gdt").integer("limit")),
        idt=DTable(f.map("idt").integer("base"), f.map("idt").integer("limit")),
    )
    for name in _SREGS_SCALARS:
        setattr(out, name, f.integer(name))
    bitmap = f.items("interrupt_bitmap")
    if len(bitmap) != 4 or not all(isinstance(w, int) for w in bitmap):
        raise SnapshotError(f"{f.where}: interrupt_bitmap is not four integers")
    out.interrupt_bitmap = (bitmap[0], bitmap[1], bitmap[2], bitmap[3])
    for name in SEGMENT_NAMES:
        setattr(out, name, _segment(f.map(name)))
    return out


def _int_rows(f: Fields, key: str, width: int) -> list[list[int]]:
    rows = f.items(key)
    for row in rows:
        if not (isinstance(row, list | tuple) and len(row) == width and all(isinstance(v, int) for v in row)):
            raise SnapshotError(f"{f.where}: {key} holds a malformed entry")
    return rows


def vcpu_to_map(s: VcpuState) -> dict[str, Any]:
    return {
        "index": s.index,
        "cpuid": [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in s.cpuid],
        "mp_state": s.mp_state,
        "regs": _plain(s.regs),
        "sregs": _plain(s.sregs),
        "xsave": s.xsave,
        "xcrs": s.xcrs,
        "debugregs": s.debugregs,
        "lapic": s.lapic,
        "msrs": [list(m) for m in s.msrs],
        "vcpu_events": s.vcpu_events,
        "tsc_khz": s.tsc_khz,
    }


def vcpu_from_map(data: object, where: str) -> VcpuState:
    f = Fields(data, where)
    regs = f.map("regs")
    return VcpuState(
        index=f.integer("index"),
        cpuid=tuple(CpuidEntry(*row) for row in _int_rows(f, "cpuid", 7)),
        mp_state=f.integer("mp_state"),
        regs=Regs(**{n.name: regs.integer(n.name) for n in dataclasses.fields(Regs)}),
        sregs=_sregs(f.map("sregs")),
        xsave=f.blob("xsave"),
        xcrs=None if f.data.get("xcrs") is None else f.blob("xcrs"),
        debugregs=f.blob("debugregs"),
        lapic=f.blob("lapic"),
        msrs=tuple((i, v) for i, v in _int_rows(f, "msrs", 2)),
        vcpu_events=f.blob("vcpu_events"),
        tsc_khz=f.integer("tsc_khz"),
    )


def vm_to_map(s: VmState) -> dict[str, Any]:
    return _plain(s)


def vm_from_map(data: object, where: str) -> VmState:
    f = Fields(data, where)
    blobs = {name: f.blob(name) for name in ("pic_master", "pic_slave", "ioapic", "pit")}
    return VmState(**blobs, clock=f.integer("clock"), saved_at=f.integer("saved_at"))


__all__ = [
    "check_cpu",
    "missing_features",
    "vcpu_from_map",
    "vcpu_to_map",
    "vm_from_map",
    "vm_to_map",
]
