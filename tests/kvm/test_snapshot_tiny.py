"""A tiny guest snapshotted mid-loop goes on counting in a new VM (evmm/kvm/state.py on this host's KVM).

The guest counts in ESI, stores it at 0x500 on every turn, and leaves the loop once the host sets the flag at
0x508, writing ESI to 0x504 on the way out.  Saved while it counts and restored into another VM with a copy
of its memory, it must go on from the count it had (the memory never goes back), and the register it carried
must agree with memory at the end: a vCPU whose registers were lost would start ESI again from 0.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from evmm.errors import KvmError
from evmm.kvm import state as kvm_state
from evmm.kvm.state import VcpuState, VmState
from tests.kvm.tiny import CODE_ADDR, Finish, Tiny, tiny_guest

COUNT, LAST, STOP = 0x500, 0x504, 0x508
# Not tiny's FINISH_PORT (0x42): with an in-kernel PIT, which a snapshot saves, KVM owns ports 0x40-0x43.
DONE_PORT = 0x99
PROGRAM = bytes.fromhex(
    "6631f6"  # xor esi, esi
    "6646"  # L: inc esi
    "6689360005"  # mov [0x500], esi
    "66833e080500"  # cmp dword [0x508], 0
    "74f1"  # je L
    "6689360405"  # mov [0x504], esi
    f"b007e6{DONE_PORT:02x}f4"  # mov al, 7; out DONE, al; hlt
)


def u32(t: Tiny, addr: int) -> int:
    return int(struct.unpack("<I", t.memory.read(addr, 4))[0])


async def until(cond: object, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("the guest did not get there in time")
        await asyncio.sleep(0.01)


@contextmanager
def with_pit(code: bytes) -> Iterator[Tiny]:
    """tiny's guest with an in-kernel PIT (part of every saved VM) and the program's own finish port."""
    with tiny_guest(code) as t:
        t.machine.parts.vm.create_pit2()
        t.pio.insert(DONE_PORT, 1, Finish(t.machine.parts.lifecycle), "done")
        yield t


def snapshot_mid_loop() -> tuple[VmState, VcpuState, bytes, int]:
    with with_pit(PROGRAM) as t:
        m = t.machine

        async def scenario() -> tuple[VmState, VcpuState, bytes, int]:
            runner = asyncio.ensure_future(m.run())
            await until(lambda: u32(t, COUNT) > 1000)
            await m.pause()
            vcpu = m.parts.vcpus[0]
            vm_state = kvm_state.save_vm(m.parts.vm)
            vcpu_state = kvm_state.save_vcpu(vcpu, kvm_state.msrs_to_save(m.parts.kvm, vcpu))
            memory = t.memory.read(0, len(t.memory.regions[0].buffer))
            count = u32(t, COUNT)
            m.stop(0, "snapshot taken")
            await runner
            return vm_state, vcpu_state, memory, count

        return t.loop.run_until_complete(asyncio.wait_for(scenario(), 60))


def test_a_tiny_guest_restored_in_a_new_vm_counts_on_from_where_it_was() -> None:
    vm_state, vcpu_state, memory, saved = snapshot_mid_loop()
    assert CODE_ADDR <= vcpu_state.regs.rip < CODE_ADDR + len(PROGRAM)
    assert vcpu_state.regs.rsi in (saved, saved + 1)  # after the store, or between the inc and the store
    assert vcpu_state.msrs, "no MSR was saved"

    with with_pit(b"\xf4") as t:  # code that would halt at once: the snapshot's must replace it
        t.memory.write(0, memory)
        kvm_state.restore_vm(t.machine.parts.vm, vm_state)
        kvm_state.restore_vcpu(t.machine.parts.vcpus[0], vcpu_state)
        m = t.machine
        seen: list[int] = []

        async def scenario() -> int:
            runner = asyncio.ensure_future(m.run())

            def progressed() -> bool:
                seen.append(u32(t, COUNT))
                return seen[-1] > saved + 1000

            await until(progressed)
            t.memory.write(STOP, struct.pack("<I", 1))
            return (await runner).code

        code = t.loop.run_until_complete(asyncio.wait_for(scenario(), 60))
        assert code == 7, "the restored guest did not reach its finish port"
        assert min(seen) >= saved, f"the count went back from {saved} to {min(seen)}"
        assert u32(t, LAST) == u32(t, COUNT) > saved + 1000  # ESI came back with the vCPU


def test_restoring_a_truncated_blob_fails_with_one_line_and_no_ioctl() -> None:
    vm_state, vcpu_state, _, _ = snapshot_mid_loop()
    with with_pit(b"\xf4") as t:
        with pytest.raises(KvmError, match=r"saved PIT state is 10 bytes, this host's KVM wants \d+"):
            kvm_state.restore_vm(t.machine.parts.vm, replace(vm_state, pit=vm_state.pit[:10]))
        with pytest.raises(KvmError, match=r"saved vCPU events are 3 bytes"):
            kvm_state.restore_vcpu(t.machine.parts.vcpus[0], replace(vcpu_state, vcpu_events=b"abc"))
