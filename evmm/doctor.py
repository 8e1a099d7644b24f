"""What this host's KVM offers, and whether guest kernels run at native speed on it (``evmm doctor``).

The speed probe runs a tiny real-mode guest (ring 0) that counts down a register and then writes a port.  On
hardware-backed KVM that loop runs natively (hundreds of millions of iterations a second); a PVM-based KVM
emulates ring-0 code instruction by instruction, thousands of times slower, and no Linux guest boots on it.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import time
from dataclasses import field

from evmm.errors import EvmmError
from evmm.hostkvm import HostKvm, probe
from evmm.kvm import OPTIONAL_CAPS, REQUIRED_CAPS, Kvm, exits
from evmm.record import record

PROBE_ITERATIONS = 20_000
NATIVE_THRESHOLD = 20_000_000  # loop iterations per second; native KVM does >100M, PVM ring 0 ~10k-100k
CODE_ADDR = 0x1000
DONE_PORT = 0x10


def speed_probe_code(iterations: int) -> bytes:
    return (
        b"\x66\xb9"
        + struct.pack("<I", iterations)  # mov ecx, iterations
        + b"\x67\xe2\xfd"  # 1: loop 1b  (address-size prefix: count in ECX)
        + b"\xb0\x42"  # mov al, 0x42
        + b"\xe6"
        + bytes([DONE_PORT])  # out DONE_PORT, al
        + b"\xf4"  # hlt
    )


def ring0_loop_rate(kvm: Kvm, iterations: int = PROBE_ITERATIONS) -> float:
    """Iterations per second of a ring-0 loop in a one-vCPU real-mode guest."""
    vm = kvm.create_vm()
    mem = mmap.mmap(-1, 0x10000)
    try:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_user_memory_region(0, 0, mem)
        mem[CODE_ADDR : CODE_ADDR + 32] = speed_probe_code(iterations).ljust(32, b"\xf4")
        vcpu = vm.create_vcpu(0)
        try:
            sregs = vcpu.get_sregs()
            sregs.cs.base, sregs.cs.selector = 0, 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = CODE_ADDR, 0x2
            vcpu.set_regs(regs)
            start = time.perf_counter()
            deadline = start + 30
            while time.perf_counter() < deadline:
                ex = vcpu.run()
                if isinstance(ex, exits.IoOut) and ex.port == DONE_PORT:
                    return iterations / max(time.perf_counter() - start, 1e-9)
                if isinstance(ex, exits.Interrupted):
                    continue
                raise EvmmError(f"speed probe guest stopped unexpectedly: {ex}")
            raise EvmmError("speed probe guest did not finish in 30 s")
        finally:
            vcpu.close()
    finally:
        vm.close()
        mem.close()


@record
class Report:
    host: HostKvm
    api_version: int = 0
    max_vcpus: int = 0
    caps: dict[str, bool] = field(default_factory=dict)
    missing_required: list[str] = field(default_factory=list)
    loop_rate: float | None = None
    probe_error: str = ""
    qemu: str | None = None

    @property
    def ring0_native(self) -> bool | None:
        return None if self.loop_rate is None else self.loop_rate >= NATIVE_THRESHOLD

    @property
    def verdict(self) -> str:
        if not self.host.present:
            return f"No usable KVM: {self.host.reason}."
        if self.missing_required:
            return f"KVM lacks {', '.join(self.missing_required)}: evmm cannot run here."
        if self.host.can_boot_linux and self.ring0_native is not False:
            return "Linux guests run directly here: `evmm run`."
        hint = "`evmm testhost run -- evmm run`"
        if self.qemu:
            return f"Guest kernels cannot run at speed on this KVM; boot Linux in the KVM test host: {hint}."
        return (
            "Guest kernels cannot run at speed on this KVM, and qemu-system-x86_64 (needed for the KVM test "
            "host) is not installed: apt-get install qemu-system-x86."
        )


def diagnose(dev: str = "/dev/kvm", *, speed_probe: bool = True) -> Report:
    report = Report(host=probe(dev), qemu=shutil.which("qemu-system-x86_64"))
    if not report.host.present:
        return report
    with Kvm(dev) as kvm:
        report.api_version = kvm.api_version()
        report.max_vcpus = kvm.max_vcpus()
        for name, cap in {**REQUIRED_CAPS, **OPTIONAL_CAPS}.items():
            report.caps[name] = bool(kvm.check_extension(cap))
        report.missing_required = [n for n in REQUIRED_CAPS if not report.caps[n]]
        if speed_probe:
            try:
                report.loop_rate = ring0_loop_rate(kvm)
            except EvmmError as e:
                report.probe_error = str(e)
    return report
