"""A VM fd: memory slots, the in-kernel irqchip and PIT, ioeventfds and irqfds, vCPU creation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from evmm.errors import KvmError
from evmm.kvm._ffi import check, ffi, ioctl, ioctl_val, lib
from evmm.record import record

if TYPE_CHECKING:
    from mmap import mmap

    from evmm.kvm.system import Kvm
    from evmm.kvm.vcpu import Vcpu


IRQCHIP_PIC_MASTER = lib.KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE = lib.KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC = lib.KVM_IRQCHIP_IOAPIC


@record(frozen=True)
class GsiRoute:
    gsi: int
    chip: int = 0
    pin: int = 0
    msi: tuple[int, int] | None = None  # (address, data) for an MSI route


class Vm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._slot_buffers: dict[int, Any] = {}  # keep cffi buffer handles alive while KVM maps them

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for handle in self._slot_buffers.values():
            ffi.release(handle)  # lets the owner close its mmap
        self._slot_buffers.clear()

    def set_user_memory_region(
        self,
        slot: int,
        gpa: int,
        buffer: mmap,
        *,
        readonly: bool = False,
        offset: int = 0,
        size: int | None = None,
    ) -> None:
        """Map ``size`` bytes of ``buffer`` (a host mapping the VMM keeps) from ``offset`` at guest-physical
        ``gpa`` as memory slot ``slot``; the whole buffer by default."""
        handle = ffi.from_buffer(buffer)
        length = len(handle) - offset if size is None else size
        if offset < 0 or length <= 0 or offset + length > len(handle):
            ffi.release(handle)
            raise ValueError(
                f"memory slot {slot}: {offset:#x}+{length:#x} is outside its {len(handle):#x} bytes"
            )
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": lib.KVM_MEM_READONLY if readonly else 0,
                "guest_phys_addr": gpa,
                "memory_size": length,
                "userspace_addr": int(ffi.cast("uintptr_t", handle)) + offset,
            },
        )
        try:
            ioctl(
                self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, f"KVM_SET_USER_MEMORY_REGION (slot {slot})"
            )
        except BaseException:
            ffi.release(handle)
            raise
        old = self._slot_buffers.pop(slot, None)
        if old is not None:
            ffi.release(old)
        self._slot_buffers[slot] = handle

    def delete_user_memory_region(self, slot: int) -> None:
        """Unmap memory slot ``slot`` (a size of zero deletes it: Documentation/virt/kvm/api.rst)."""
        region = ffi.new("struct kvm_userspace_memory_region *", {"slot": slot, "memory_size": 0})
        ioctl(
            self.fd,
            lib.KVM_SET_USER_MEMORY_REGION,
            region,
            f"KVM_SET_USER_MEMORY_REGION (delete slot {slot})",
        )
        handle = self._slot_buffers.pop(slot, None)
        if handle is not None:
            ffi.release(handle)

    def set_tss_addr(self, addr: int) -> None:
        ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        val = ffi.new("uint64_t *", addr)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, val, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """The in-kernel PIC pair, IOAPIC and per-vCPU LAPICs: interrupts never need the VMM's thread."""
        ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive GSI ``irq`` (PIC + IOAPIC pin) to ``level``; safe from any thread."""
        lvl = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)})
        ioctl(self.fd, lib.KVM_IRQ_LINE, lvl, f"KVM_IRQ_LINE (irq {irq})")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """Let KVM signal eventfd ``fd`` on a guest write to ``addr`` instead of exiting to userspace."""
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        ioctl(self.fd, lib.KVM_IOEVENTFD, arg, f"KVM_IOEVENTFD ({addr:#x})")

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """Let a write to eventfd ``fd`` inject GSI ``gsi`` from the kernel, with no ioctl per interrupt."""
        arg = ffi.new(
            "struct kvm_irqfd *",
            {"fd": fd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0},
        )
        ioctl(self.fd, lib.KVM_IRQFD, arg, f"KVM_IRQFD (gsi {gsi})")

    def set_gsi_routing(self, routes: list[GsiRoute]) -> None:
        """Replace the whole GSI routing table (irqchip pins and MSI messages)."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, r in enumerate(routes):
            e = table.entries[i]
            e.gsi = r.gsi
            if r.msi is not None:
                e.type = lib.KVM_IRQ_ROUTING_MSI
                addr, data = r.msi
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = addr & 0xFFFFFFFF, addr >> 32, data
            else:
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = r.chip, r.pin
        ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def signal_msi(self, address: int, data: int) -> None:
        msi = ffi.new(
            "struct kvm_msi *",
            {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data},
        )
        check(lib.evmm_ioctl(self.fd, lib.KVM_SIGNAL_MSI, msi), "KVM_SIGNAL_MSI")

    def get_clock(self) -> int:
        data = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, lib.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return int(data.clock)

    def set_clock(self, clock: int) -> None:
        data = ffi.new("struct kvm_clock_data *", {"clock": clock})
        ioctl(self.fd, lib.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    # ---- snapshot and restore: the in-kernel PIC pair, IOAPIC and PIT as opaque blobs ------------------------

    def get_irqchip(self, chip: int) -> bytes:
        s = ffi.new("struct kvm_irqchip *", {"chip_id": chip})
        ioctl(self.fd, lib.KVM_GET_IRQCHIP, s, f"KVM_GET_IRQCHIP (chip {chip})")
        return bytes(ffi.buffer(s))

    def set_irqchip(self, blob: bytes) -> None:
        s = ffi.new("struct kvm_irqchip *")
        _fill(s, blob, "irqchip")
        ioctl(self.fd, lib.KVM_SET_IRQCHIP, s, f"KVM_SET_IRQCHIP (chip {s.chip_id})")

    def get_pit2(self) -> bytes:
        s = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, lib.KVM_GET_PIT2, s, "KVM_GET_PIT2")
        return bytes(ffi.buffer(s))

    def set_pit2(self, blob: bytes) -> None:
        s = ffi.new("struct kvm_pit_state2 *")
        _fill(s, blob, "PIT")
        ioctl(self.fd, lib.KVM_SET_PIT2, s, "KVM_SET_PIT2")

    def create_vcpu(self, index: int) -> Vcpu:
        from evmm.kvm.vcpu import Vcpu

        fd = ioctl_val(self.fd, lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU ({index})")
        return Vcpu(self, index, fd, self.kvm.vcpu_mmap_size())


def _fill(s: Any, blob: bytes, what: str) -> None:
    size = ffi.sizeof(s[0])
    if len(blob) != size:
        raise KvmError(f"saved {what} state is {len(blob)} bytes, this host's KVM wants {size}")
    ffi.memmove(s, blob, size)
