"""``/dev/kvm``: the system fd, the first level of the KVM fd hierarchy (system -> VM -> vCPU)."""

from __future__ import annotations

import os

from evmm.errors import KvmError
from evmm.kvm._ffi import check, ffi, ioctl, ioctl_val, lib
from evmm.kvm.types import CpuidEntry
from evmm.kvm.vm import Vm

# Capabilities every evmm machine needs, with the name users will search for.
REQUIRED_CAPS: dict[str, int] = {
    "KVM_CAP_IRQCHIP": lib.KVM_CAP_IRQCHIP,
    "KVM_CAP_USER_MEMORY": lib.KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": lib.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_EXT_CPUID": lib.KVM_CAP_EXT_CPUID,
    "KVM_CAP_PIT2": lib.KVM_CAP_PIT2,
    "KVM_CAP_IOEVENTFD": lib.KVM_CAP_IOEVENTFD,
    "KVM_CAP_IRQFD": lib.KVM_CAP_IRQFD,
    "KVM_CAP_IMMEDIATE_EXIT": lib.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_MP_STATE": lib.KVM_CAP_MP_STATE,
}

# Reported by ``evmm doctor``; evmm works without them but loses a feature.
OPTIONAL_CAPS: dict[str, int] = {
    "KVM_CAP_SET_IDENTITY_MAP_ADDR": lib.KVM_CAP_SET_IDENTITY_MAP_ADDR,
    "KVM_CAP_IRQ_ROUTING": lib.KVM_CAP_IRQ_ROUTING,
    "KVM_CAP_SIGNAL_MSI": lib.KVM_CAP_SIGNAL_MSI,
    "KVM_CAP_ADJUST_CLOCK": lib.KVM_CAP_ADJUST_CLOCK,
    "KVM_CAP_VCPU_EVENTS": lib.KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_XSAVE": lib.KVM_CAP_XSAVE,
    "KVM_CAP_XCRS": lib.KVM_CAP_XCRS,
    "KVM_CAP_DEBUGREGS": lib.KVM_CAP_DEBUGREGS,
    "KVM_CAP_TSC_CONTROL": lib.KVM_CAP_TSC_CONTROL,
    "KVM_CAP_PIT_STATE2": lib.KVM_CAP_PIT_STATE2,
    "KVM_CAP_SYNC_MMU": lib.KVM_CAP_SYNC_MMU,
    "KVM_CAP_IOEVENTFD_ANY_LENGTH": lib.KVM_CAP_IOEVENTFD_ANY_LENGTH,
}

_CPUID_MAX_ENTRIES = 256


class Kvm:
    """An open ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(
                f"{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd)"
            ) from None
        except PermissionError:
            raise KvmError(f"{path}: permission denied (run as root or join the kvm group)") from None
        except OSError as e:
            raise KvmError(f"cannot open {path}: {e.strerror}") from None
        self.path = path
        version = self.api_version()
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"{path} speaks KVM API version {version}, evmm needs {lib.KVM_API_VERSION}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def api_version(self) -> int:
        return ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """The capability's value (0 when absent; some capabilities report a count)."""
        return max(int(lib.evmm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap)), 0)

    def require(self, caps: dict[str, int] | None = None) -> None:
        """Raise a ``KvmError`` naming the first missing capability."""
        for name, cap in (caps or REQUIRED_CAPS).items():
            if not self.check_extension(cap):
                raise KvmError(f"{self.path} lacks {name}, which evmm needs (a newer host kernel has it)")

    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4

    def vcpu_mmap_size(self) -> int:
        return ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry]:
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": _CPUID_MAX_ENTRIES, "entries": _CPUID_MAX_ENTRIES})
        ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid, "KVM_GET_SUPPORTED_CPUID")
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))
        ]

    def msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0})
        ret = lib.evmm_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, probe)  # E2BIG, but tells the count
        if ret < 0 and probe.nmsrs == 0:
            check(ret, "KVM_GET_MSR_INDEX_LIST")
        n = probe.nmsrs
        lst = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> Vm:
        fd = ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)
