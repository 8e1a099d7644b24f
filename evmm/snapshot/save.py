"""Saving a paused machine to a snapshot directory (``snapshot`` on the control channel).

Runs on the reactor, which owns every device.  Once the devices' requests in flight have finished (awaited),
the devices are frozen (``devices.freeze``: nothing of theirs writes guest RAM, neither the kernel's vhost
rings nor the reactor's own handlers of host input: tap frames, vsock streams, console input), the vCPU, VM
and device state is taken in one synchronous step, and guest memory is written by an I/O worker while the
reactor goes on serving the control channel and the consoles; the devices thaw once it is on disk.  The
machine stays paused throughout; ``resume`` goes on as before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evmm.kvm import state as kvm_state
from evmm.log import log
from evmm.machine.machine import Machine
from evmm.record import record
from evmm.snapshot import devices
from evmm.snapshot.config import config_to_map
from evmm.snapshot.cpu import vcpu_to_map, vm_to_map
from evmm.snapshot.disks import copy_image
from evmm.snapshot.format import MEMORY_FILE, STATE_FILE, SnapshotError, write_state
from evmm.snapshot.memfile import save_memory


@record(frozen=True)
class SnapshotInfo:
    directory: Path
    state_bytes: int
    memory_size: int  # the guest's RAM: the memory file's apparent size
    memory_written: int  # bytes of it that hold data (the rest are holes)
    disks: dict[str, str]  # drive id -> how it was copied ("reflink", "copy"), with disks="copy"
    seconds: float

    def describe(self) -> dict[str, Any]:
        return {
            "dir": str(self.directory),
            "state_bytes": self.state_bytes,
            "memory_size": self.memory_size,
            "memory_written": self.memory_written,
            "disks": self.disks,
            "ms": round(self.seconds * 1000, 1),
        }


def disk_file(drive_id: str) -> str:
    return f"disk-{drive_id}.img"


def drive_ids(machine: Machine) -> list[str]:
    return [d.id or f"blk{i}" for i, d in enumerate(machine.config.drives)]


def _macs(machine: Machine) -> list[str]:
    slotted = {id(s.device) for s in machine.devices.slots}
    nics = [t.device for t in devices.transports(machine) if type(t.device).__name__ == "VirtioNet"]
    return [":".join(f"{b:02x}" for b in nic.mac) for nic in nics if id(nic) not in slotted]  # type: ignore[attr-defined]


def _prepare(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SnapshotError(f"snapshot {directory}: cannot create it: {e.strerror}") from None
    if not directory.is_dir():
        raise SnapshotError(f"snapshot {directory}: not a directory")


async def save_snapshot(machine: Machine, directory: Path, *, copy_disks: bool = False) -> SnapshotInfo:
    """Write the paused ``machine`` to ``directory``; every failure is one ``SnapshotError`` line."""
    where = f"snapshot {directory}"
    if machine.state != "paused":
        raise SnapshotError(f"{where}: the VM is {machine.state}; pause it first")
    devices.check(machine, where)
    start = time.monotonic()
    _prepare(directory)
    parts = machine.parts
    kvm_state.require_snapshot_caps(parts.kvm, "snapshot")
    await devices.quiesce(machine, where)
    thaw = devices.freeze(machine)
    try:
        msrs = kvm_state.msrs_to_save(parts.kvm, parts.vcpus[0])
        vm = kvm_state.save_vm(parts.vm)
        vcpus = [kvm_state.save_vcpu(v, msrs) for v in parts.vcpus]
        device_states = devices.save_devices(machine, where)
        written = await save_memory(parts.memory, directory)
        copied: dict[str, str] = {}
        if copy_disks:
            for drive, drive_id in zip(machine.config.drives, drive_ids(machine), strict=True):
                copied[drive_id] = copy_image(drive.path, directory / disk_file(drive_id))
    finally:
        thaw()
    config = machine.config
    body = {
        "config": {**config_to_map(config, _macs(machine)), "cmdline": parts.cmdline},
        "memory": {"file": MEMORY_FILE, "layout": [[r.gpa, r.size] for r in parts.memory.regions]},
        "vm": vm_to_map(vm),
        "vcpus": [vcpu_to_map(v) for v in vcpus],
        "devices": device_states,
        "disks": {drive_id: disk_file(drive_id) for drive_id in copied},
        "created_at": time.time(),
    }
    size = write_state(directory, body)
    info = SnapshotInfo(directory, size, parts.memory.size, written, copied, time.monotonic() - start)
    log.debug(
        "snapshot %s: %s %d bytes, memory %d of %d bytes written, in %.1f ms",
        directory,
        STATE_FILE,
        size,
        written,
        parts.memory.size,
        info.seconds * 1000,
    )
    return info


__all__ = ["SnapshotInfo", "disk_file", "drive_ids", "save_snapshot"]
