"""Every device of a built machine to one map and back, through each device's persist functions.

Which persist module serves a device is decided here, by its type, so devices and the builder know nothing of
snapshots.  The order of a save: ``quiesce`` (await: requests in flight finish), ``freeze`` (stop what
writes guest RAM without the paused guest asking: vhost's rings, and the reactor's handlers of host input,
which go on running while an I/O worker writes the memory) for the time the state and the memory are taken,
then ``thaw``.  The order of a restore: the legacy devices, then for each virtio slot the transport's
registers, the device's state, the activation on the restored queues, and what a device does once running
again (vsock's TRANSPORT_RESET).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.devices.acpi_pm_persist import restore as restore_acpi_pm
from evmm.devices.acpi_pm_persist import restore_boot_timer, save_boot_timer
from evmm.devices.acpi_pm_persist import save as save_acpi_pm
from evmm.devices.legacy import i8042_persist, rtc_persist, serial_persist
from evmm.devices.virtio import mmio_persist
from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.mmio import VirtioMmio
from evmm.machine.hotplug import HotplugSlot
from evmm.machine.machine import Machine
from evmm.snapshot.format import Fields, SnapshotError

Saver = Callable[[Any], dict[str, Any]]
Restorer = Callable[[Any, object, str], None]


# The persist module of each kind of virtio device, imported only for the kinds a machine has.  Each defines
# ``save`` and ``restore``, and may define ``held`` (buffers it keeps for later, per queue), ``quiesce``
# (async: finish requests in flight), ``freeze`` (stop writing guest RAM until memory is saved; returns a
# thaw) and ``after_restore`` (once running on the restored queues).
PERSIST_MODULES = {
    "VirtioBlk": "evmm.devices.virtio.blk.persist",
    "VirtioNet": "evmm.devices.virtio.net.persist",
    "VirtioVsock": "evmm.devices.virtio.vsock.persist",
    "VhostVsock": "evmm.devices.virtio.vsock.persist",
    "VirtioConsole": "evmm.devices.virtio.console_persist",
    "VirtioRng": "evmm.devices.virtio.rng_persist",
}


# Devices a snapshot refuses, and why.  virtio-fs: the guest holds FUSE node IDs and file handles (FUSE's
# include/uapi/linux/fuse.h: nodeid, fh) that stand for open O_PATH and file descriptors of this process; a
# new process cannot open the same files again by number, and by name they may have moved or gone, so
# carrying the table over would hand the guest files that are not the ones it had.
REFUSED = {
    "VirtioFs": "its FUSE state (the guest's inode and file handle numbers, each an open host file) cannot be "
    "carried to another process; snapshot a VM without --fs",
    "VhostNet": "the kernel's vhost-net holds its rings, which evmm does not save yet; snapshot a VM whose NICs "
    "and net slots have vhost=off (--net ...,vhost=off, --hotplug ...,vhost=off)",
}


def virtio_persist(device: VirtioDevice) -> ModuleType:
    kind = type(device).__name__
    module = PERSIST_MODULES.get(kind)
    if module is None:
        why = REFUSED.get(kind, "it has no snapshot support")
        raise SnapshotError(f"a {device.name} device cannot be snapshotted: {why}")
    return importlib.import_module(module)


def _legacy(machine: Machine) -> dict[str, tuple[Any, Saver, Restorer]]:
    d = machine.devices
    table: dict[str, tuple[object, Saver, Restorer]] = {
        "serial": (d.serial, serial_persist.save, serial_persist.restore),
        "rtc": (d.rtc, rtc_persist.save, rtc_persist.restore),
        "i8042": (d.i8042, i8042_persist.save, i8042_persist.restore),
        "acpi_pm": (d.acpi_pm, save_acpi_pm, restore_acpi_pm),
        "boot_timer": (d.boot_timer, save_boot_timer, restore_boot_timer),
    }
    return {key: entry for key, entry in table.items() if entry[0] is not None}


def transports(machine: Machine) -> list[VirtioMmio]:
    return machine.devices.transports


def _slot_of(machine: Machine, device: VirtioDevice) -> HotplugSlot | None:
    return next((s for s in machine.devices.slots if s.device is device), None)


def check(machine: Machine, where: str) -> None:
    """Refuse, before anything is written, a machine with a device that cannot be snapshotted."""
    if machine.config.board != "microvm":
        # The standard board's PCI functions (config space, BARs, MSI-X tables, the GSI routes they
        # programmed) have no saved form yet; a snapshot without them would restore a guest whose devices
        # answer nothing.
        raise SnapshotError(
            f"{where}: only the microvm board can be snapshotted (this is --machine {machine.config.board})"
        )
    for i, t in enumerate(transports(machine)):
        try:
            virtio_persist(t.device)
        except SnapshotError as e:
            raise SnapshotError(f"{where}: virtio slot {i}: {e}") from None


# ---- save ------------------------------------------------------------------------------------------------


async def quiesce(machine: Machine, where: str) -> None:
    """Wait for the requests devices have in flight (a paused guest starts no new ones)."""
    for i, t in enumerate(transports(machine)):
        wait = getattr(virtio_persist(t.device), "quiesce", None)
        if wait is not None:
            await wait(t.device, f"{where}: virtio slot {i} ({t.device.name})")


def freeze(machine: Machine) -> Callable[[], None]:
    """Stop what writes guest RAM until the returned ``thaw``: vhost-vsock's kernel rings, and what a device
    does on host input (a tap's frame, a vsock stream's data, console input)."""
    thaws = []
    for t in transports(machine):
        stop = getattr(virtio_persist(t.device), "freeze", None)
        if stop is not None:
            thaws.append(stop(t.device))

    def thaw() -> None:
        for undo in thaws:
            undo()

    return thaw


def save_devices(machine: Machine, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {name: save(dev) for name, (dev, save, _) in _legacy(machine).items()}
    virtio = []
    for i, t in enumerate(transports(machine)):
        p = virtio_persist(t.device)
        slot = _slot_of(machine, t.device)
        held = p.held(t.device) if hasattr(p, "held") else {}
        state = mmio_persist.save(t, p.save(t.device), f"{where}: virtio slot {i} ({t.device.name})", held)
        state["slot"] = None if slot is None else {"id": slot.id, "kind": slot.kind, "backend": slot.backend}
        virtio.append(state)
    out["virtio"] = virtio
    return out


# ---- restore ---------------------------------------------------------------------------------------------


def _refill_slot(slot: HotplugSlot, saved: Fields, device_state: Fields) -> None:
    backend = saved.opt_text("backend")
    if backend is None:
        return
    if saved.text("kind") == "blk":
        slot.fill(DriveSpec(path=Path(backend), readonly=device_state.boolean("readonly")))
    elif backend.startswith("fd "):
        raise SnapshotError(
            f"{saved.where}: slot {slot.id} was filled with a tap fd, which cannot be given again"
        )
    else:
        slot.fill(NetSpec(tap=backend))


def restore_devices(machine: Machine, data: object, where: str) -> None:
    f = Fields(data, where)
    for name, (dev, _, restore) in _legacy(machine).items():
        if name not in f.data:
            raise SnapshotError(f"{where}: no state for the {name} device")
        restore(dev, f.data[name], f"{where}: {name}")
    saved = f.items("virtio")
    ts = transports(machine)
    if len(saved) != len(ts):
        raise SnapshotError(f"{where}: {len(saved)} virtio devices saved, the restored machine has {len(ts)}")
    started = []
    for i, (t, data_i) in enumerate(zip(ts, saved, strict=True)):
        here = f"{where}: virtio slot {i} ({t.device.name})"
        regs = mmio_persist.restore_registers(t, data_i, here)
        slot = _slot_of(machine, t.device)
        if slot is not None and regs.data.get("slot") is not None:
            _refill_slot(slot, regs.map("slot"), regs.map("device"))
        p = virtio_persist(t.device)
        p.restore(t.device, regs.data.get("device"), f"{here}: device")
        mmio_persist.activate(t, regs)
        started.append((p, t.device))
    for p, device in started:
        after = getattr(p, "after_restore", None)
        if after is not None and device.activated:
            after(device)


__all__ = [
    "PERSIST_MODULES",
    "REFUSED",
    "check",
    "freeze",
    "quiesce",
    "restore_devices",
    "save_devices",
    "transports",
    "virtio_persist",
]
