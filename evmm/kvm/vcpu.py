"""A vCPU fd: register state and ``KVM_RUN`` with the shared ``kvm_run`` page.

``run()`` is the hot path: it releases the GIL for the ioctl (cffi does so for every C call), then decodes the
exit into one of the small objects in ``exits.py``.  Pointers to the exit union's views are computed once.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from evmm.errors import KvmError
from evmm.kvm import exits
from evmm.kvm._ffi import check, ffi, ioctl, ioctl_val, lib
from evmm.kvm.types import SEGMENT_NAMES, CpuidEntry, DTable, Fpu, Regs, Segment, Sregs

if TYPE_CHECKING:
    from evmm.kvm.hook import ExitHook
    from evmm.kvm.vm import Vm

_REG_NAMES = tuple(f.name for f in fields(Regs))
_SEG_FIELDS = tuple(f.name for f in fields(Segment))
_INTERRUPTED = exits.Interrupted()
_HLT = exits.Hlt()
_SHUTDOWN = exits.Shutdown()

_EXIT_IO = lib.KVM_EXIT_IO
_EXIT_MMIO = lib.KVM_EXIT_MMIO
_EXIT_IO_OUT = lib.KVM_EXIT_IO_OUT
_KVM_RUN = lib.KVM_RUN
_EINTR = -errno.EINTR
_EAGAIN = -errno.EAGAIN
_CPUID_ENTRIES = 256


class Vcpu:
    def __init__(self, vm: Vm, index: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self._page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._handle = ffi.from_buffer(self._page)
        self._run: Any = ffi.cast("struct kvm_run *", self._handle)
        union = ffi.cast("char *", self._handle) + lib.EVMM_RUN_EXIT_UNION_OFFSET
        self._io: Any = ffi.cast("evmm_exit_io *", union)
        self._mmio: Any = ffi.cast("evmm_exit_mmio *", union)
        self._internal: Any = ffi.cast("evmm_exit_internal *", union)
        self._system_event: Any = ffi.cast("evmm_exit_system_event *", union)
        self._fail_entry: Any = ffi.cast("evmm_exit_fail_entry *", union)
        self._pending_in: tuple[int, int] = (0, 0)
        self._hooks: tuple[ExitHook, ...] = ()  # their owners stay alive while run() may call into them
        self._hook_table: Any = None
        self._hooked: Any = ffi.new("uint64_t *")

    def set_exit_hooks(self, hooks: Sequence[ExitHook]) -> None:
        """Let ``run`` answer the accesses these hooks take in C (evmm/kvm/hook.py); () turns them off.

        Only while the vCPU is not running: ``run`` reads the table without a lock."""
        table = ffi.new("evmm_exit_hook[]", len(hooks)) if hooks else None
        for i, h in enumerate(hooks):
            assert table is not None
            e = table[i]
            e.pio, e.base, e.length = int(h.pio), h.base, h.length
            e.fn = ffi.cast("evmm_access_fn", h.c_function)
            e.ctx = ffi.cast("void *", h.c_context)
        self._hooks, self._hook_table = tuple(hooks), table

    @property
    def hooked_exits(self) -> int:
        """Exits the exit hooks answered without returning to Python."""
        return int(self._hooked[0])

    def close(self) -> None:
        if self.fd >= 0:
            del self._run, self._io, self._mmio, self._internal, self._system_event, self._fail_entry
            self.set_exit_hooks(())
            ffi.release(self._handle)
            self._page.close()
            os.close(self.fd)
            self.fd = -1

    # ---- running -------------------------------------------------------------------------------------------

    def run(self) -> exits.VmExit:
        if self._hook_table is not None:
            ret = lib.evmm_run_hooked(self.fd, self._run, self._hook_table, len(self._hooks), self._hooked)
        else:
            ret = lib.evmm_ioctl_val(self.fd, _KVM_RUN, 0)
        if ret < 0:
            if ret in (_EINTR, _EAGAIN):
                return _INTERRUPTED
            raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {os.strerror(-ret)}")
        reason = self._run.exit_reason
        if reason == _EXIT_IO:
            io = self._io
            n = io.size * io.count
            off = io.data_offset
            if io.direction == _EXIT_IO_OUT:
                return exits.IoOut(io.port, io.size, io.count, self._page[off : off + n])
            self._pending_in = (off, n)
            return exits.IoIn(io.port, io.size, io.count)
        if reason == _EXIT_MMIO:
            m = self._mmio
            if m.is_write:
                return exits.MmioWrite(m.phys_addr, m.len, bytes(ffi.buffer(m.data, m.len)))
            return exits.MmioRead(m.phys_addr, m.len)
        return self._slow_exit(reason)

    def _slow_exit(self, reason: int) -> exits.VmExit:
        if reason == lib.KVM_EXIT_HLT:
            return _HLT
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == lib.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            return exits.SystemEvent(self._system_event.type)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            e = self._internal
            n = min(e.ndata, 16)
            return exits.InternalError(e.suberror, tuple(int(e.data[i]) for i in range(n)))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            f = self._fail_entry
            return exits.FailEntry(f.hardware_entry_failure_reason, f.cpu)
        return exits.Unhandled(reason)

    def complete_io_in(self, data: bytes) -> None:
        """Give the guest the result of the last ``IoIn``; KVM copies it into RAX/memory on the next run."""
        off, n = self._pending_in
        self._page[off : off + n] = data[:n].ljust(n, b"\xff")

    def complete_mmio_read(self, data: bytes) -> None:
        n = self._mmio.len
        ffi.memmove(self._mmio.data, data[:n].ljust(n, b"\xff"), n)

    def set_immediate_exit(self, on: bool) -> None:
        """With this set, the next (or current, once signalled) KVM_RUN returns EINTR at once."""
        self._run.immediate_exit = 1 if on else 0

    # ---- registers -----------------------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        r = ffi.new("struct kvm_regs *")
        ioctl(self.fd, lib.KVM_GET_REGS, r, "KVM_GET_REGS")
        return Regs(**{n: getattr(r, n) for n in _REG_NAMES})

    def set_regs(self, regs: Regs) -> None:
        r = ffi.new("struct kvm_regs *", {n: getattr(regs, n) for n in _REG_NAMES})
        ioctl(self.fd, lib.KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        s = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, lib.KVM_GET_SREGS, s, "KVM_GET_SREGS")
        out = Sregs(
            gdt=DTable(s.gdt.base, s.gdt.limit),
            idt=DTable(s.idt.base, s.idt.limit),
            cr0=s.cr0,
            cr2=s.cr2,
            cr3=s.cr3,
            cr4=s.cr4,
            cr8=s.cr8,
            efer=s.efer,
            apic_base=s.apic_base,
            interrupt_bitmap=(
                int(s.interrupt_bitmap[0]),
                int(s.interrupt_bitmap[1]),
                int(s.interrupt_bitmap[2]),
                int(s.interrupt_bitmap[3]),
            ),
        )
        for name in SEGMENT_NAMES:
            seg = getattr(s, name)
            setattr(out, name, Segment(**{f: getattr(seg, f) for f in _SEG_FIELDS}))
        return out

    def set_sregs(self, sregs: Sregs) -> None:
        s = ffi.new("struct kvm_sregs *")
        for name in SEGMENT_NAMES:
            seg = getattr(s, name)
            src = getattr(sregs, name)
            for f in _SEG_FIELDS:
                setattr(seg, f, getattr(src, f))
        s.gdt.base, s.gdt.limit = sregs.gdt.base, sregs.gdt.limit
        s.idt.base, s.idt.limit = sregs.idt.base, sregs.idt.limit
        s.cr0, s.cr2, s.cr3, s.cr4, s.cr8 = sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8
        s.efer, s.apic_base = sregs.efer, sregs.apic_base
        for i, word in enumerate(sregs.interrupt_bitmap):
            s.interrupt_bitmap[i] = word
        ioctl(self.fd, lib.KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def set_fpu(self, fpu: Fpu) -> None:
        f = ffi.new("struct kvm_fpu *")
        f.fcw, f.fsw, f.ftwx, f.mxcsr = fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr
        f.last_opcode, f.last_ip, f.last_dp = fpu.last_opcode, fpu.last_ip, fpu.last_dp
        ioctl(self.fd, lib.KVM_SET_FPU, f, "KVM_SET_FPU")

    def set_msrs(self, msrs: list[tuple[int, int]]) -> None:
        arg = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for i, (index, value) in enumerate(msrs):
            arg.entries[i].index = index
            arg.entries[i].data = value
        done = ioctl(self.fd, lib.KVM_SET_MSRS, arg, "KVM_SET_MSRS")
        if done != len(msrs):
            raise KvmError(f"KVM_SET_MSRS refused MSR {msrs[done][0]:#x} on vCPU {self.index}")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        arg = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            arg.entries[i].index = index
        done = ioctl(self.fd, lib.KVM_GET_MSRS, arg, "KVM_GET_MSRS")
        return {arg.entries[i].index: arg.entries[i].data for i in range(done)}

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        arg = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            d = arg.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, lib.KVM_SET_CPUID2, arg, "KVM_SET_CPUID2")

    def get_lapic(self) -> bytearray:
        s = ffi.new("struct kvm_lapic_state *")
        ioctl(self.fd, lib.KVM_GET_LAPIC, s, "KVM_GET_LAPIC")
        return bytearray(ffi.buffer(s))

    def set_lapic(self, regs: bytes | bytearray) -> None:
        s = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(s, bytes(regs), ffi.sizeof(s[0]))
        ioctl(self.fd, lib.KVM_SET_LAPIC, s, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        s = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, lib.KVM_GET_MP_STATE, s, "KVM_GET_MP_STATE")
        return int(s.mp_state)

    def set_mp_state(self, state: int) -> None:
        s = ffi.new("struct kvm_mp_state *", {"mp_state": state})
        ioctl(self.fd, lib.KVM_SET_MP_STATE, s, "KVM_SET_MP_STATE")

    def get_tsc_khz(self) -> int:
        return ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    # ---- snapshot and restore (evmm/kvm/state.py orders these calls) ---------------------------------------

    def get_cpuid(self) -> list[CpuidEntry]:
        """The CPUID table KVM holds for this vCPU, as set and as KVM updated it (KVM_GET_CPUID2)."""
        n = _CPUID_ENTRIES
        while True:
            arg = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            ret = lib.evmm_ioctl(self.fd, lib.KVM_GET_CPUID2, arg)
            if ret != -errno.E2BIG or n >= 4 * _CPUID_ENTRIES:
                break
            n *= 2
        check(ret, "KVM_GET_CPUID2")
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (arg.entries[i] for i in range(arg.nent))
        ]

    def _xsave_size(self) -> int:
        # KVM_CAP_XSAVE2 gives the size the host's XSAVE state needs (more than struct kvm_xsave's 4 KiB once
        # AMX is enabled); 0 on kernels before 5.17, which only know the 4 KiB struct.
        return max(self.vm.kvm.check_extension(lib.KVM_CAP_XSAVE2), int(ffi.sizeof("struct kvm_xsave")))

    def get_xsave(self) -> bytes:
        size = self._xsave_size()
        buf = ffi.new("char[]", size)
        big = size > ffi.sizeof("struct kvm_xsave")
        ioctl(self.fd, lib.KVM_GET_XSAVE2 if big else lib.KVM_GET_XSAVE, buf, "KVM_GET_XSAVE")
        return bytes(ffi.buffer(buf))

    def set_xsave(self, blob: bytes) -> None:
        size = self._xsave_size()
        if len(blob) > size:
            raise KvmError(f"saved vCPU XSAVE state is {len(blob)} bytes, this host's KVM takes {size}")
        buf = ffi.new("char[]", size)
        ffi.memmove(buf, blob, len(blob))
        ioctl(self.fd, lib.KVM_SET_XSAVE, buf, "KVM_SET_XSAVE")

    def set_vcpu_events(self, blob: bytes) -> None:
        """Restore pending exceptions, interrupts and NMIs.  KVM_GET_VCPU_EVENTS does not flag the pending NMI
        and the SIPI vector as valid, so KVM_SET_VCPU_EVENTS would ignore them (as QEMU does, set the flags)."""
        s = ffi.new("struct kvm_vcpu_events *")
        if len(blob) != ffi.sizeof(s[0]):
            raise KvmError(
                f"saved vCPU events are {len(blob)} bytes, this host's KVM wants {ffi.sizeof(s[0])}"
            )
        ffi.memmove(s, blob, len(blob))
        s.flags |= lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SIPI_VECTOR
        ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, s, "KVM_SET_VCPU_EVENTS")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_val(self.fd, lib.KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> bool:
        """Tell the guest's kvmclock it was stopped (PVCLOCK_GUEST_STOPPED), so its soft-lockup watchdog does
        not take the time it spent as a snapshot for a hung CPU.  False when the guest has no kvmclock
        (KVM answers EINVAL: booted with no-kvmclock, or not yet set up)."""
        ret = lib.evmm_ioctl_val(self.fd, lib.KVM_KVMCLOCK_CTRL, 0)
        if ret == -errno.EINVAL:
            return False
        check(ret, "KVM_KVMCLOCK_CTRL")
        return True

    # Whole-state blobs for save/restore: opaque bytes, restored as they were saved.
    def get_state_blob(self, kind: str) -> bytes:
        ctype, get_req, _ = _BLOBS[kind]
        s = ffi.new(f"{ctype} *")
        ioctl(self.fd, get_req, s, f"KVM_GET_{kind.upper()}")
        return bytes(ffi.buffer(s))

    def set_state_blob(self, kind: str, blob: bytes) -> None:
        ctype, _, set_req = _BLOBS[kind]
        s = ffi.new(f"{ctype} *")
        size = ffi.sizeof(s[0])
        if len(blob) != size:
            raise KvmError(f"saved vCPU {kind} state is {len(blob)} bytes, this host's KVM wants {size}")
        ffi.memmove(s, blob, size)
        ioctl(self.fd, set_req, s, f"KVM_SET_{kind.upper()}")


_BLOBS: dict[str, tuple[str, int, int]] = {
    "vcpu_events": ("struct kvm_vcpu_events", lib.KVM_GET_VCPU_EVENTS, lib.KVM_SET_VCPU_EVENTS),
    "xcrs": ("struct kvm_xcrs", lib.KVM_GET_XCRS, lib.KVM_SET_XCRS),
    "debugregs": ("struct kvm_debugregs", lib.KVM_GET_DEBUGREGS, lib.KVM_SET_DEBUGREGS),
}
