"""Restoring a snapshot into a new machine (``evmm run --restore``, ``restore`` on a warm ``evmm serve``).

``load_snapshot`` reads and checks everything that can be checked before KVM is touched: the state file
(format, evmm version, checksum), the vCPU and VM state, the configuration with the host resources given
again.  ``restore_machine`` then checks this host's KVM (capabilities, CPU features), maps the memory file
MAP_PRIVATE, builds the same board without booting it, and puts back the VM's state, every vCPU's and every
device's.  Then, as a guest on new hardware at a later time needs:

* the guest clock is corrected: kvmclock and every TSC move on by the host time the VM spent as a snapshot,
  so the guest's wall clock is right again (as after a host suspend), and KVM_KVMCLOCK_CTRL tells the
  guest's watchdog that the jump was a stop, not a hung CPU;
* a new VM generation ID is written and notified (the guest reseeds its RNG: a clone must not draw the
  random numbers its siblings draw);
* vsock's TRANSPORT_RESET tells the guest its host connections are gone.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from evmm.arch.x86 import layout
from evmm.kvm import Kvm
from evmm.kvm import state as kvm_state
from evmm.kvm.state import VcpuState, VmState
from evmm.log import log
from evmm.loop.console import ConsoleIO
from evmm.machine.config import MachineConfig
from evmm.machine.machine import Machine
from evmm.record import record
from evmm.snapshot.config import Overrides, apply_overrides, config_from_map
from evmm.snapshot.cpu import check_cpu, vcpu_from_map, vm_from_map
from evmm.snapshot.devices import restore_devices
from evmm.snapshot.format import Fields, SnapshotError, read_state
from evmm.snapshot.memfile import load_memory


@record(frozen=True)
class Snapshot:
    """A snapshot read and checked, with the configuration the restored machine will have."""

    directory: Path
    config: MachineConfig
    layout: list[tuple[int, int]]
    vm: VmState
    vcpus: list[VcpuState]
    devices: object  # the devices' map, checked as each device is restored
    disks: dict[str, str]  # drive id -> file name in the directory, for drives the snapshot copied

    @property
    def where(self) -> str:
        return f"snapshot {self.directory}"


def load_snapshot(directory: Path, overrides: Overrides | None = None) -> Snapshot:
    where = f"snapshot {directory}"
    f = Fields(read_state(directory), where)
    saved = config_from_map(f.data.get("config"), f"{where}: config")
    config = apply_overrides(saved, overrides or Overrides(), where)
    vcpus = [vcpu_from_map(v, f"{where}: vcpu {i}") for i, v in enumerate(f.items("vcpus"))]
    if len(vcpus) != config.cpus or not vcpus:
        raise SnapshotError(f"{where}: {len(vcpus)} vCPU states for a machine of {config.cpus}")
    memory = f.map("memory")
    regions = [tuple(r) for r in memory.items("layout")]
    if regions != [tuple(r) for r in layout.ram_layout(config.memory)]:
        raise SnapshotError(f"{where}: its memory layout is not the one evmm gives {config.memory >> 20} MiB")
    for i, drive in enumerate(config.drives):
        if not drive.path.exists():
            raise SnapshotError(
                f"{where}: the guest's disk {drive.id or f'blk{i}'} was {drive.path}, which does not exist; "
                "give it again with --drive path=IMAGE"
            )
    disks = f.map("disks").data
    return Snapshot(
        directory=directory,
        config=config,
        layout=layout.ram_layout(config.memory),
        vm=vm_from_map(f.data.get("vm"), f"{where}: vm"),
        vcpus=vcpus,
        devices=f.data.get("devices"),
        disks={str(k): str(v) for k, v in disks.items()},
    )


@record(frozen=True)
class RestoreOptions:
    correct_clock: bool = True  # move kvmclock and the TSCs on by the time spent as a snapshot
    new_generation: bool = True  # a new VM generation ID, notified


def check_host(snap: Snapshot, kvm_path: str = "/dev/kvm") -> None:
    """This host's KVM can hold the snapshot's state and offers every CPU feature its guest uses."""
    with Kvm(kvm_path) as kvm:
        kvm_state.require_snapshot_caps(kvm, "restore")
        check_cpu(snap.where, snap.vcpus[0].cpuid, kvm.supported_cpuid())


def restore_machine(
    snap: Snapshot,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    *,
    stdio: tuple[int, int] | None = None,
    options: RestoreOptions | None = None,
    kvm_path: str = "/dev/kvm",
) -> Machine:
    """A machine in the snapshot's state, not yet running (``Machine.run`` starts its vCPUs)."""
    from evmm.machine.microvm import build_microvm

    options = options or RestoreOptions()
    start = time.monotonic()
    check_host(snap, kvm_path)
    memory = load_memory(snap.directory, snap.layout)
    try:
        machine = build_microvm(
            snap.config, loop, console, stdio=stdio, kvm_path=kvm_path, memory=memory, boot=False
        )
    except BaseException:
        memory.close()
        raise
    built = time.monotonic()
    try:
        parts = machine.parts
        advance = kvm_state.elapsed_since(snap.vm) if options.correct_clock else 0
        kvm_state.restore_vm(parts.vm, snap.vm, advance_ns=advance)
        for vcpu, state in zip(parts.vcpus, snap.vcpus, strict=True):
            kvm_state.restore_vcpu(vcpu, state, advance_ns=advance)
        stopped = [v.kvmclock_ctrl() for v in parts.vcpus]
        restore_devices(machine, snap.devices, f"{snap.where}: devices")
        vmgenid = parts.devices.vmgenid
        if options.new_generation and vmgenid is not None:
            vmgenid.new_generation()
    except BaseException:
        machine.close()
        raise
    log.debug(
        "restored %s: built in %.1f ms, state in %.1f ms; clock moved on %.3f s; kvmclock stopped on %d of %d vCPUs",
        snap.directory,
        (built - start) * 1000,
        (time.monotonic() - built) * 1000,
        advance / 1e9,
        sum(stopped),
        len(stopped),
    )
    return machine


__all__ = ["RestoreOptions", "Snapshot", "check_host", "load_snapshot", "restore_machine"]
