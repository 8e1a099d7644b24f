"""Plain-Python images of KVM's register structures.

These cross the ``evmm/kvm`` boundary instead of cdata: boot code fills them, snapshot code stores them.
"""

from __future__ import annotations

from dataclasses import field

from evmm.record import record


@record
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set (Intel SDM vol. 1 §3.4.3)


@record
class Segment:
    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the descriptor's L bit, named as in the SDM and <linux/kvm.h>
    g: int = 0
    avl: int = 0
    unusable: int = 0


@record
class DTable:
    base: int = 0
    limit: int = 0


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@record
class Sregs:
    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)


@record
class Fpu:
    fcw: int = 0x37F  # x87 default control word after FNINIT (SDM vol. 1 §8.1.5)
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    mxcsr: int = 0x1F80  # SSE default: all exceptions masked (SDM vol. 1 §10.2.3)


@record(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def with_regs(self, **regs: int) -> CpuidEntry:
        vals = {"eax": self.eax, "ebx": self.ebx, "ecx": self.ecx, "edx": self.edx}
        vals.update(regs)
        return CpuidEntry(self.function, self.index, self.flags, **vals)
