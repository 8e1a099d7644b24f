"""The seccomp BPF compiler, byte for byte, and its interpreter against the programs it makes."""

from __future__ import annotations

import errno
import struct

import pytest

from evmm.confine.bpf import (
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_TRAP,
    ArgHasBits,
    ArgIn,
    Insn,
    Rule,
    assemble,
    compile_filter,
    run,
)

LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
TRAP = SECCOMP_RET_TRAP
ALLOW = SECCOMP_RET_ALLOW


def test_a_small_policy_compiles_to_exactly_this_program() -> None:
    prog = compile_filter(
        [
            Rule("read"),
            Rule("ioctl", ArgIn(1, (0xAE80, 0x4008AE67))),
            Rule("clone", ArgHasBits(0, 0x10000)),
            Rule("clone3", errno=errno.ENOSYS),
        ],
        TRAP,
    )
    assert prog == [
        Insn(LD, 0, 0, 4),  # arch
        Insn(JEQ, 1, 0, AUDIT_ARCH_X86_64),
        Insn(RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
        Insn(LD, 0, 0, 0),  # nr
        Insn(JGE, 0, 1, 0x40000000),  # x32
        Insn(RET, 0, 0, TRAP),
        Insn(JEQ, 0, 1, 0),  # read
        Insn(RET, 0, 0, ALLOW),
        Insn(JEQ, 0, 6, 16),  # ioctl: the block of six below
        Insn(LD, 0, 0, 24),  # args[1], low half
        Insn(JEQ, 0, 1, 0xAE80),
        Insn(RET, 0, 0, ALLOW),
        Insn(JEQ, 0, 1, 0x4008AE67),
        Insn(RET, 0, 0, ALLOW),
        Insn(RET, 0, 0, TRAP),
        Insn(LD, 0, 0, 0),  # nr again
        Insn(JEQ, 0, 4, 56),  # clone
        Insn(LD, 0, 0, 16),
        Insn(JSET, 0, 1, 0x10000),
        Insn(RET, 0, 0, ALLOW),
        Insn(RET, 0, 0, TRAP),
        Insn(LD, 0, 0, 0),
        Insn(JEQ, 0, 1, 435),  # clone3
        Insn(RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        Insn(RET, 0, 0, TRAP),
    ]
    raw = assemble(prog)
    assert len(raw) == 8 * len(prog)
    assert raw[:8] == struct.pack("<HBBI", 0x20, 0, 0, 4)


def test_the_program_does_what_the_rules_say() -> None:
    prog = compile_filter(
        [Rule("read"), Rule("ioctl", ArgIn(1, (0xAE80,))), Rule("clone", ArgHasBits(0, 0x10000))], TRAP
    )
    assert run(prog, 0) == ALLOW
    assert run(prog, 1) == TRAP  # write: not listed
    assert run(prog, 16, [3, 0xAE80]) == ALLOW
    assert run(prog, 16, [3, 0xAE81]) == TRAP
    # The kernel's ioctl takes an unsigned int request: the high half is not the filter's business.
    assert run(prog, 16, [3, 0xFFFFFFFF_0000AE80]) == ALLOW
    assert run(prog, 56, [0x3D0F00]) == ALLOW  # pthread_create's flags
    assert run(prog, 56, [0x01200011]) == TRAP  # fork's
    assert run(prog, 0x40000000 | 0) == TRAP  # x32 read
    assert run(prog, 0, arch=0x40000003) == SECCOMP_RET_KILL_PROCESS  # i386


def test_a_call_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        compile_filter([Rule("read"), Rule("read")], TRAP)


def test_too_many_values_for_one_jump_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        compile_filter([Rule("ioctl", ArgIn(1, tuple(range(200))))], TRAP)


def test_an_unknown_call_is_named() -> None:
    with pytest.raises(KeyError, match="no x86-64 system call named 'frobnicate'"):
        compile_filter([Rule("frobnicate")], TRAP)
