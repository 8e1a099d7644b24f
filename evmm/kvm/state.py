"""A vCPU's and a VM's KVM state as plain records, saved and restored in the order KVM requires.

The order, and why (Documentation/virt/kvm/api.rst; the same notes lead Firecracker's vstate/vcpu and Cloud
Hypervisor's cpu.rs):

* save: MP_STATE first, because KVM_GET_MP_STATE runs kvm_apic_accept_events(), which can change the LAPIC
  and the vCPU's state; VCPU_EVENTS last, since the other GETs may still move a pending event.
* restore: CPUID2 first (what KVM accepts later depends on the guest's CPUID), then MP_STATE, REGS, SREGS
  (which carries the APIC base), XSAVE, XCRS, DEBUGREGS, then the LAPIC (after SREGS, which would reset it
  with the APIC base), then the MSRs (after the LAPIC: MSR_IA32_TSC_DEADLINE is only accepted by a LAPIC in
  TSC-deadline mode, and it is written after MSR_IA32_TSC, against which KVM arms the timer), and
  VCPU_EVENTS last: KVM_SET_REGS clears a pending exception, which KVM_SET_VCPU_EVENTS puts back.
* every vCPU of the VM must be out of KVM_RUN (paused) while any of this runs.

The MSRs saved are those of KVM_GET_MSR_INDEX_LIST and the ones evmm sets at boot (MTRRs and
MISC_ENABLE, which the index list lacks), less two that cannot be restored (below), and only those
KVM_GET_MSRS can read on this vCPU: what KVM cannot read it will not take back either.

Raw cdata stays in ``vcpu.py``/``vm.py``; these records hold ints, tuples and bytes only.
"""

from __future__ import annotations

import time

from evmm.errors import KvmError
from evmm.kvm._ffi import lib
from evmm.kvm.system import Kvm
from evmm.kvm.types import CpuidEntry, Regs, Sregs
from evmm.kvm.vcpu import Vcpu
from evmm.kvm.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, Vm
from evmm.record import record

MSR_IA32_TSC = 0x10
MSR_IA32_FEATURE_CONTROL = 0x3A
MSR_IA32_MCG_CTL = 0x17B
MSR_IA32_TSC_DEADLINE = 0x6E0
# Set at boot by evmm (evmm/arch/x86/msrs.py) but absent from KVM's index list: without them a restored guest
# runs with MTRRs disabled, i.e. all RAM uncached (Intel SDM vol. 3A §11.11.2.1).
MSR_IA32_MISC_ENABLE = 0x1A0
MTRR_MSRS = (
    *range(0x200, 0x210),  # IA32_MTRR_PHYSBASE0..PHYSMASK7 (SDM vol. 3A §11.11.2.3)
    0x250,  # IA32_MTRR_FIX64K_00000
    0x258,  # IA32_MTRR_FIX16K_80000
    0x259,  # IA32_MTRR_FIX16K_A0000
    *range(0x268, 0x270),  # IA32_MTRR_FIX4K_C0000..F8000
    0x277,  # IA32_PAT
    0x2FF,  # IA32_MTRR_DEF_TYPE
)
# Never restored, as Firecracker does not: IA32_FEATURE_CONTROL is locked by firmware and its VMX bits depend
# on nested-virtualisation settings of the host; IA32_MCG_CTL exists only with MCG_CTL_P, which KVM's
# machine-check emulation decides, and writing it otherwise fails.
NOT_RESTORED = frozenset({MSR_IA32_FEATURE_CONTROL, MSR_IA32_MCG_CTL})

# What a snapshot needs of the host's KVM, with the name users will search for.  Not KVM_CAP_XCRS: a host CPU
# without XSAVE (QEMU's qemu64 model, on which the KVM test host runs) has none, and no guest XCR0 to save.
SNAPSHOT_CAPS: dict[str, int] = {
    "KVM_CAP_IRQCHIP": lib.KVM_CAP_IRQCHIP,
    "KVM_CAP_MP_STATE": lib.KVM_CAP_MP_STATE,
    "KVM_CAP_VCPU_EVENTS": lib.KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_XSAVE": lib.KVM_CAP_XSAVE,
    "KVM_CAP_DEBUGREGS": lib.KVM_CAP_DEBUGREGS,
    "KVM_CAP_PIT_STATE2": lib.KVM_CAP_PIT_STATE2,
    "KVM_CAP_ADJUST_CLOCK": lib.KVM_CAP_ADJUST_CLOCK,
    "KVM_CAP_GET_TSC_KHZ": lib.KVM_CAP_GET_TSC_KHZ,
}
# Within this many parts per million the TSC rates of two hosts are the same (calibration noise); QEMU's and
# Firecracker's tolerance.
TSC_KHZ_TOLERANCE_PPM = 250


def require_snapshot_caps(kvm: Kvm, what: str) -> None:
    """A ``KvmError`` naming the first capability a snapshot (``what``: "snapshot", "restore") needs and
    this host's KVM lacks."""
    for name, cap in SNAPSHOT_CAPS.items():
        if not kvm.check_extension(cap):
            raise KvmError(f"cannot {what}: {kvm.path} lacks {name}, which saving a VM's state needs")


@record(frozen=True)
class VcpuState:
    index: int
    cpuid: tuple[CpuidEntry, ...]
    mp_state: int
    regs: Regs
    sregs: Sregs
    xsave: bytes
    xcrs: bytes | None  # None: the host has no XSAVE, so neither has the guest an XCR0 (no KVM_CAP_XCRS)
    debugregs: bytes
    lapic: bytes
    msrs: tuple[tuple[int, int], ...]  # (index, value), in restore order (TSC_DEADLINE after TSC)
    vcpu_events: bytes
    tsc_khz: int


@record(frozen=True)
class VmState:
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: int  # kvmclock, ns
    saved_at: int  # the host's CLOCK_REALTIME when the clock was read, ns


def msrs_to_save(kvm: Kvm, vcpu: Vcpu) -> list[int]:
    """The MSRs worth saving for this VM, in the order to restore them (see the module docstring)."""
    candidates = [*kvm.msr_index_list(), MSR_IA32_MISC_ENABLE, *MTRR_MSRS]
    out: list[int] = []
    seen: set[int] = set()
    for index in candidates:
        if index in seen or index in NOT_RESTORED:
            continue
        seen.add(index)
        if vcpu.get_msrs([index]):  # one at a time: KVM_GET_MSRS stops at the first it cannot read
            out.append(index)
    # MSR_IA32_TSC_DEADLINE last, after MSR_IA32_TSC: KVM arms the deadline timer against the TSC it has.
    out.sort(key=lambda i: i == MSR_IA32_TSC_DEADLINE)
    return out


def save_vcpu(vcpu: Vcpu, msrs: list[int]) -> VcpuState:
    """The vCPU's whole state; it must be out of KVM_RUN, and so must every other vCPU of the VM."""
    mp_state = vcpu.get_mp_state()
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    xsave = vcpu.get_xsave()
    xcrs = vcpu.get_state_blob("xcrs") if vcpu.vm.kvm.check_extension(lib.KVM_CAP_XCRS) else None
    debugregs = vcpu.get_state_blob("debugregs")
    lapic = bytes(vcpu.get_lapic())
    cpuid = tuple(vcpu.get_cpuid())
    values = vcpu.get_msrs(msrs)
    if len(values) != len(msrs):
        missing = msrs[len(values)]
        raise KvmError(f"vCPU {vcpu.index}: KVM_GET_MSRS cannot read MSR {missing:#x}, which it read before")
    saved = [(i, values[i]) for i in msrs]
    tsc = values.get(MSR_IA32_TSC)
    if tsc is not None:
        # A TSC deadline of 0 with the timer in deadline mode means an expiry that fired but whose interrupt
        # has not reached the guest; restored as 0 the timer is disarmed and this vCPU's clock events stop
        # for good (Firecracker saw it).  The current TSC instead fires it again at once.
        saved = [(i, tsc if i == MSR_IA32_TSC_DEADLINE and v == 0 else v) for i, v in saved]
    vcpu_events = vcpu.get_state_blob("vcpu_events")
    return VcpuState(
        index=vcpu.index,
        cpuid=cpuid,
        mp_state=mp_state,
        regs=regs,
        sregs=sregs,
        xsave=xsave,
        xcrs=xcrs,
        debugregs=debugregs,
        lapic=lapic,
        msrs=tuple(saved),
        vcpu_events=vcpu_events,
        tsc_khz=vcpu.get_tsc_khz(),
    )


def tsc_scaling_needed(saved_khz: int, host_khz: int) -> bool:
    return abs(saved_khz - host_khz) * 1_000_000 > saved_khz * TSC_KHZ_TOLERANCE_PPM


def restore_vcpu(vcpu: Vcpu, state: VcpuState, *, advance_ns: int = 0) -> None:
    """Put ``state`` into a fresh vCPU of a VM whose irqchip exists; ``advance_ns`` moves the guest's TSC on by
    that much time (the time the VM spent as a snapshot, when its clock is corrected)."""
    host_khz = vcpu.get_tsc_khz()
    if tsc_scaling_needed(state.tsc_khz, host_khz):
        try:
            vcpu.set_tsc_khz(state.tsc_khz)
        except KvmError:
            raise KvmError(
                f"the snapshot's guest TSC runs at {state.tsc_khz} kHz, this host's at {host_khz} kHz, and "
                "its KVM cannot scale the TSC (KVM_CAP_TSC_CONTROL)"
            ) from None
    ticks = advance_ns * state.tsc_khz // 1_000_000
    msrs = [(i, v + ticks if i in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE) and v else v) for i, v in state.msrs]
    vcpu.set_cpuid(list(state.cpuid))
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(state.regs)
    vcpu.set_sregs(state.sregs)
    vcpu.set_xsave(state.xsave)
    if state.xcrs is not None:
        if not vcpu.vm.kvm.check_extension(lib.KVM_CAP_XCRS):
            raise KvmError("the snapshot's guest has XCR0 (XSAVE); this host's KVM lacks KVM_CAP_XCRS")
        vcpu.set_state_blob("xcrs", state.xcrs)
    vcpu.set_state_blob("debugregs", state.debugregs)
    vcpu.set_lapic(state.lapic)
    deferred = [m for m in msrs if m[0] == MSR_IA32_TSC_DEADLINE]
    vcpu.set_msrs([m for m in msrs if m[0] != MSR_IA32_TSC_DEADLINE])
    if deferred:
        vcpu.set_msrs(deferred)
    vcpu.set_vcpu_events(state.vcpu_events)


def save_vm(vm: Vm) -> VmState:
    return VmState(
        pic_master=vm.get_irqchip(IRQCHIP_PIC_MASTER),
        pic_slave=vm.get_irqchip(IRQCHIP_PIC_SLAVE),
        ioapic=vm.get_irqchip(IRQCHIP_IOAPIC),
        pit=vm.get_pit2(),
        clock=vm.get_clock(),
        saved_at=time.clock_gettime_ns(time.CLOCK_REALTIME),
    )


def restore_vm(vm: Vm, state: VmState, *, advance_ns: int = 0) -> None:
    """The VM-wide state, before any vCPU's (the LAPICs route through the IOAPIC restored here)."""
    vm.set_pit2(state.pit)
    vm.set_clock(state.clock + advance_ns)
    for blob in (state.pic_master, state.pic_slave, state.ioapic):
        vm.set_irqchip(blob)


def elapsed_since(state: VmState) -> int:
    """Nanoseconds of host real time since ``state`` was saved (0 if the host clock went back)."""
    return max(time.clock_gettime_ns(time.CLOCK_REALTIME) - state.saved_at, 0)


__all__ = [
    "SNAPSHOT_CAPS",
    "VcpuState",
    "VmState",
    "elapsed_since",
    "msrs_to_save",
    "require_snapshot_caps",
    "restore_vcpu",
    "restore_vm",
    "save_vcpu",
    "save_vm",
    "tsc_scaling_needed",
]
