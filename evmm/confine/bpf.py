"""A seccomp filter compiled to classic BPF by evmm itself (as Firecracker's seccompiler does): pure, so the
program a policy gives can be checked byte for byte without a kernel.

The program sees ``struct seccomp_data`` (include/uapi/linux/seccomp.h): ``nr`` at offset 0, ``arch`` at 4,
``instruction_pointer`` at 8 and ``args[6]`` (u64 each) from 16.  Its shape:

    arch != AUDIT_ARCH_X86_64          -> KILL_PROCESS   (another ABI's numbers mean other calls)
    nr has the x32 bit (0x40000000)    -> the policy's mismatch action
    for each rule, hottest first:
        nr == rule's call ?  no argument check -> its action
                             else: load the argument's low 32 bits; each allowed value -> ALLOW;
                                   none matched -> mismatch
    -> mismatch

Argument checks read only the low 32 bits of a 64-bit ``args[i]``; each checked parameter (``ioctl``'s
request, ``socket``'s domain, ``clone``'s flags, ``tgkill``'s tgid, ...) is a 32-bit ``int`` or
``unsigned int`` in the kernel's prototype, which drops the high half before looking at it, so a caller
gains nothing by setting it.  Rules are tested in order, one comparison each, so the policy lists its
hottest calls first (docs/security.md has the measured counts).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from evmm.confine.syscalls import number
from evmm.record import record

# <linux/filter.h> / <linux/bpf_common.h>
BPF_LD, BPF_JMP, BPF_RET = 0x00, 0x05, 0x06
BPF_W, BPF_ABS = 0x00, 0x20
BPF_JA, BPF_JEQ, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x30, 0x40
BPF_K = 0x00
BPF_MAXINSNS = 4096

# <linux/seccomp.h> return actions (the high 16 bits; the low 16 are data, e.g. an errno).
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH_X86_64 = 0xC000003E  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE (<linux/audit.h>)
X32_SYSCALL_BIT = 0x40000000

_OFF_NR, _OFF_ARCH, _OFF_ARGS = 0, 4, 16
_JUMP_MAX = 255  # jt and jf are 8-bit


@record(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int

    def pack(self) -> bytes:
        return struct.pack("<HBBI", self.code, self.jt, self.jf, self.k)


@record(frozen=True)
class ArgIn:
    """Allow the call only when the low 32 bits of ``args[index]`` are one of ``values``."""

    index: int
    values: tuple[int, ...]


@record(frozen=True)
class ArgHasBits:
    """Allow the call only when ``args[index]`` has every bit of ``bits`` set (``clone`` with CLONE_THREAD)."""

    index: int
    bits: int


@record(frozen=True)
class Rule:
    """One system call a role may make: allowed outright, allowed when its argument passes ``check``, or
    answered with ``errno`` without running (``clone3``: its flags are behind a pointer no filter can read,
    and glibc falls back to ``clone`` on ENOSYS)."""

    syscall: str
    check: ArgIn | ArgHasBits | None = None
    errno: int | None = None

    @property
    def nr(self) -> int:
        return number(self.syscall)


def _stmt(code: int, k: int) -> Insn:
    return Insn(code, 0, 0, k)


def _jump(op: int, k: int, jt: int, jf: int) -> Insn:
    if not (0 <= jt <= _JUMP_MAX and 0 <= jf <= _JUMP_MAX):
        raise ValueError(f"BPF jump out of range ({jt}, {jf}): split the rule's values")
    return Insn(BPF_JMP | op | BPF_K, jt, jf, k)


def _load(offset: int) -> Insn:
    return _stmt(BPF_LD | BPF_W | BPF_ABS, offset)


def _ret(action: int) -> Insn:
    return _stmt(BPF_RET | BPF_K, action)


def _arg_block(check: ArgIn | ArgHasBits, mismatch: int) -> list[Insn]:
    """The instructions after a rule's ``nr`` matched: load the argument, allow or mismatch; all end in RET."""
    out = [_load(_OFF_ARGS + 8 * check.index)]
    if isinstance(check, ArgIn):
        for value in check.values:
            out += [_jump(BPF_JEQ, value & 0xFFFFFFFF, 0, 1), _ret(SECCOMP_RET_ALLOW)]
    else:
        if bin(check.bits).count("1") != 1:  # JSET tests "any of these bits"
            raise ValueError("ArgHasBits takes one bit")
        out += [_jump(BPF_JSET, check.bits, 0, 1), _ret(SECCOMP_RET_ALLOW)]
    out.append(_ret(mismatch))
    return out


def compile_filter(rules: Sequence[Rule], mismatch: int) -> list[Insn]:
    """The BPF program allowing ``rules`` (in their order) and answering every other call with ``mismatch``."""
    seen: set[str] = set()
    prog = [
        _load(_OFF_ARCH),
        _jump(BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        _ret(SECCOMP_RET_KILL_PROCESS),
        _load(_OFF_NR),
        _jump(BPF_JGE, X32_SYSCALL_BIT, 0, 1),
        _ret(mismatch),
    ]
    for rule in rules:
        if rule.syscall in seen:
            raise ValueError(f"system call {rule.syscall} listed twice")
        seen.add(rule.syscall)
        if rule.check is None:
            action = SECCOMP_RET_ALLOW if rule.errno is None else SECCOMP_RET_ERRNO | (rule.errno & 0xFFFF)
            prog += [_jump(BPF_JEQ, rule.nr, 0, 1), _ret(action)]
        else:
            block = _arg_block(rule.check, mismatch)
            prog += [_jump(BPF_JEQ, rule.nr, 0, len(block)), *block]
            # The block loaded an argument over nr: reload it for the rules after.
            prog.append(_load(_OFF_NR))
    prog.append(_ret(mismatch))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"filter of {len(prog)} instructions exceeds BPF_MAXINSNS ({BPF_MAXINSNS})")
    return prog


def assemble(prog: Sequence[Insn]) -> bytes:
    """The program as the kernel reads it: an array of ``struct sock_filter``."""
    return b"".join(i.pack() for i in prog)


def run(prog: Sequence[Insn], nr: int, args: Sequence[int] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Interpret ``prog`` on one system call: the action the kernel would take (for tests and ``evmm``'s own
    checks; covers exactly the instructions ``compile_filter`` emits)."""
    full = [*args, *([0] * (6 - len(args)))]
    data = struct.pack("<iI Q 6Q", nr, arch, 0, *(a & 0xFFFFFFFFFFFFFFFF for a in full))
    acc = 0
    pc = 0
    while pc < len(prog):
        insn = prog[pc]
        if insn.code == BPF_LD | BPF_W | BPF_ABS:
            (acc,) = struct.unpack_from("<I", data, insn.k)
            pc += 1
        elif insn.code == BPF_RET | BPF_K:
            return insn.k
        elif insn.code & 0x07 == BPF_JMP:
            op = insn.code & 0xF0
            if op == BPF_JA:
                pc += 1 + insn.k
                continue
            taken = {
                BPF_JEQ: acc == insn.k,
                BPF_JGE: acc >= insn.k,
                BPF_JSET: bool(acc & insn.k),
            }[op]
            pc += 1 + (insn.jt if taken else insn.jf)
        else:
            raise ValueError(f"instruction {pc} ({insn.code:#x}) is not one compile_filter emits")
    raise ValueError("the program ran off its end")
