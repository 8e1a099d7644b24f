"""A whole microvm machine (its devices, the VMGenID, the state and memory files) saved and restored on this
host's KVM, without Linux: the board built as for a restore (``boot=False``) runs a tiny real-mode counter.

save_snapshot writes the state file and a sparse memory file; load_snapshot and restore_machine build a new
machine from them (memory MAP_PRIVATE); the counter goes on from where it was, the register it carries
agrees with memory at the end, the VM generation ID changed and the GED event for it is pending.
"""

from __future__ import annotations

import asyncio
import signal
import struct
from pathlib import Path

import pytest
import uvloop

from evmm.arch.x86 import layout
from evmm.config.devspec import FsSpec
from evmm.loop.vcpu_thread import KICK_SIGNAL
from evmm.machine.config import MachineConfig
from evmm.machine.machine import Machine
from evmm.machine.microvm import build_microvm
from evmm.snapshot.format import SnapshotError
from evmm.snapshot.restore import load_snapshot, restore_machine
from evmm.snapshot.save import save_snapshot
from tests.kvm.test_snapshot_tiny import COUNT, LAST, STOP

CODE = 0x1000
# As test_snapshot_tiny's program, but halting at the end: this board has no finish port.
PROGRAM = bytes.fromhex("6631f66646668936000566833e08050074f16689360405f4")


def u32(machine: Machine, addr: int) -> int:
    return int(struct.unpack("<I", machine.parts.memory.read(addr, 4))[0])


async def until(cond: object, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "the guest did not get there in time"
        await asyncio.sleep(0.01)


def start_counting(machine: Machine) -> None:
    machine.parts.memory.write(CODE, PROGRAM)
    vcpu = machine.parts.vcpus[0]
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = CODE, 0x2, 0xF000
    vcpu.set_regs(regs)


def test_a_machine_saved_to_files_and_restored_counts_on(tmp_path: Path) -> None:
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    config = MachineConfig(kernel=Path("/dev/null"), memory=32 << 20)
    snap = tmp_path / "snap"

    loop = uvloop.new_event_loop()
    machine = build_microvm(config, loop, None, boot=False)
    start_counting(machine)
    generation = machine.devices.vmgenid
    assert generation is not None
    generation.write(b"generation one!!")

    async def save() -> tuple[int, dict[str, object]]:
        runner = asyncio.ensure_future(machine.run())
        await until(lambda: u32(machine, COUNT) > 1000)
        await machine.pause()
        info = await save_snapshot(machine, snap)
        saved = u32(machine, COUNT)
        machine.stop(0, "saved")
        await runner
        return saved, info.describe()

    try:
        saved, info = loop.run_until_complete(save())
    finally:
        machine.close()
        loop.close()
    assert info["memory_size"] == 32 << 20
    assert 0 < int(info["memory_written"]) < 1 << 20  # type: ignore[call-overload]  # a few pages: sparse
    assert (snap / "memory").stat().st_blocks * 512 < 2 << 20

    loop = uvloop.new_event_loop()
    restored = restore_machine(load_snapshot(snap), loop, None)
    seen: list[int] = []

    async def run_on() -> None:
        assert u32(restored, COUNT) == saved
        runner = asyncio.ensure_future(restored.run())

        def progressed() -> bool:
            seen.append(u32(restored, COUNT))
            return seen[-1] > saved + 1000

        await until(progressed)
        restored.parts.memory.write(STOP, struct.pack("<I", 1))
        await until(lambda: u32(restored, LAST) != 0)  # the guest left its loop and halted
        restored.stop(0, "done")
        await runner

    try:
        loop.run_until_complete(asyncio.wait_for(run_on(), 60))
        assert min(seen) >= saved
        assert u32(restored, LAST) == u32(restored, COUNT) > saved + 1000  # ESI came back with the vCPU
        after = restored.parts.memory.read(layout.VMGENID_ADDR, 16)
        assert after != b"generation one!!" and len(after) == 16  # a new generation ID on restore ...
        pm = restored.devices.acpi_pm
        assert pm is not None
        assert (
            pm.read(layout.ACPI_PM_GED_EVENT, 1) == layout.ACPI_GED_EVENT_VMGENID
        )  # ... and its notification
    finally:
        restored.close()
        loop.close()
    assert (snap / "memory").stat().st_blocks * 512 < 2 << 20  # the restored VM never wrote the file


def test_a_machine_with_a_shared_directory_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    share = tmp_path / "share"
    share.mkdir()
    config = MachineConfig(kernel=Path("/dev/null"), memory=32 << 20, fss=(FsSpec(share, "share"),))
    snap = tmp_path / "snap"
    loop = uvloop.new_event_loop()
    machine = build_microvm(config, loop, None, boot=False)
    start_counting(machine)

    async def save() -> None:
        runner = asyncio.ensure_future(machine.run())
        await until(lambda: u32(machine, COUNT) > 10)
        await machine.pause()
        try:
            with pytest.raises(SnapshotError) as e:
                await save_snapshot(machine, snap)
        finally:
            machine.stop(0, "done")
            await runner
        message = str(e.value)
        assert "\n" not in message
        assert message.startswith(f"snapshot {snap}: virtio slot 0: a virtio-fs device cannot be snapshotted")
        assert "snapshot a VM without --fs" in message

    try:
        loop.run_until_complete(save())
    finally:
        machine.close()
        loop.close()
    assert not snap.exists()
