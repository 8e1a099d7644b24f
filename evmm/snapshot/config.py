"""The machine's configuration in a snapshot, and what a restore may give again.

The snapshot keeps everything the machine was built from.  A restore rebuilds the same board (RAM size,
vCPUs, the same devices in the same slots: the guest found them at boot and will not look again) and
reattaches each device to host resources: those given again at restore (``Overrides``: a clone's own disk,
tap, vsock socket and CID), or else the ones the snapshot names.  Anything that would change the board is
refused in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from evmm.config.devspec import ConsoleSpec, DriveSpec, NetSpec, RngSpec, VsockSpec
from evmm.machine.config import MachineConfig
from evmm.record import record
from evmm.snapshot.format import Fields, SnapshotError


@record(frozen=True)
class Overrides:
    """Host resources given again at restore; None keeps the snapshot's."""

    drives: tuple[DriveSpec, ...] | None = None
    nets: tuple[NetSpec, ...] | None = None
    vsock: VsockSpec | None = None
    console: ConsoleSpec | None = None


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def config_to_map(config: MachineConfig, macs: list[str]) -> dict[str, Any]:
    """``macs``: each NIC's MAC as the guest knows it (a NIC without mac= got one derived at boot)."""
    return {
        "kernel": str(config.kernel),
        "initrd": _path(config.initrd),
        "cmdline": config.cmdline,
        "memory": config.memory,
        "cpus": config.cpus,
        "board": config.board,
        "serial": config.serial,
        "drives": [
            {"path": str(d.path), "readonly": d.readonly, "id": d.id, "serial": d.serial}
            for d in config.drives
        ],
        "nets": [
            {"tap": n.tap, "fd": n.fd, "mac": mac, "id": n.id}
            for n, mac in zip(config.nets, macs, strict=True)
        ],
        "vsock": None
        if config.vsock is None
        else {"cid": config.vsock.cid, "path": _path(config.vsock.path), "vhost": config.vsock.vhost},
        "console": None
        if config.console is None
        else {"kind": config.console.kind, "path": _path(config.console.path)},
        "rng": None if config.rng is None else {"rate": config.rng.rate},
        "virtio_cmdline": config.virtio_cmdline,
        "hotplug_blk": config.hotplug_blk,
        "hotplug_net": config.hotplug_net,
    }


def _opt_int(f: Fields, key: str) -> int | None:
    return None if f.data.get(key) is None else f.integer(key)


def _opt_map(f: Fields, key: str) -> Fields | None:
    return None if f.data.get(key) is None else f.map(key)


def config_from_map(data: object, where: str) -> MachineConfig:
    f = Fields(data, where)
    drives = [Fields(d, f"{where}: drive {i}") for i, d in enumerate(f.items("drives"))]
    nets = [Fields(n, f"{where}: nic {i}") for i, n in enumerate(f.items("nets"))]
    vsock, console, rng = _opt_map(f, "vsock"), _opt_map(f, "console"), _opt_map(f, "rng")
    virtio_cmdline = f.data.get("virtio_cmdline")
    initrd = f.opt_text("initrd")
    return MachineConfig(
        kernel=Path(f.text("kernel")),
        initrd=None if initrd is None else Path(initrd),
        cmdline=f.text("cmdline"),
        memory=f.integer("memory"),
        cpus=f.integer("cpus"),
        board=f.text("board"),
        serial=f.text("serial"),
        drives=tuple(
            DriveSpec(Path(d.text("path")), d.boolean("readonly"), d.opt_text("id"), d.opt_text("serial"))
            for d in drives
        ),
        nets=tuple(
            # A snapshot holds no vhost-net NIC (evmm.snapshot.devices.REFUSED): its NICs are evmm's own.
            NetSpec(n.opt_text("tap"), _opt_int(n, "fd"), n.opt_text("mac"), n.opt_text("id"), vhost=False)
            for n in nets
        ),
        vsock=None
        if vsock is None
        else VsockSpec(vsock.integer("cid"), _opt_path(vsock.opt_text("path")), vsock.boolean("vhost")),
        console=None
        if console is None
        else ConsoleSpec(console.text("kind"), _opt_path(console.opt_text("path"))),
        rng=None if rng is None else RngSpec(_opt_int(rng, "rate")),
        virtio_cmdline=virtio_cmdline if isinstance(virtio_cmdline, bool) else None,
        hotplug_blk=f.integer("hotplug_blk"),
        hotplug_net=f.integer("hotplug_net"),
        hotplug_vhost=False,
    )


def _opt_path(text: str | None) -> Path | None:
    return None if text is None else Path(text)


def _same_count(where: str, what: str, option: str, saved: int, given: int) -> None:
    if saved != given:
        raise SnapshotError(
            f"{where}: the guest has {saved} {what}; give {option} for each of them, in order, or none (got {given})"
        )


def apply_overrides(saved: MachineConfig, given: Overrides, where: str) -> MachineConfig:
    """The snapshot's configuration with the host resources given again; a change of board is one line."""
    config = saved
    if given.drives is not None:
        _same_count(where, "disks", "--drive", len(saved.drives), len(given.drives))
        drives = tuple(
            dataclasses.replace(
                new, id=new.id or old.id, serial=new.serial if new.serial is not None else old.serial
            )
            for old, new in zip(saved.drives, given.drives, strict=True)
        )
        config = dataclasses.replace(config, drives=drives)
    if given.nets is not None:
        _same_count(where, "NICs", "--net", len(saved.nets), len(given.nets))
        if any(new.vhost for new in given.nets):
            raise SnapshotError(f"{where}: the guest's NICs are evmm's own; they cannot move to vhost=on")
        nets = tuple(
            dataclasses.replace(new, mac=new.mac or old.mac, id=new.id or old.id, vhost=old.vhost)
            for old, new in zip(saved.nets, given.nets, strict=True)
        )
        config = dataclasses.replace(config, nets=nets)
    if given.vsock is not None:
        if saved.vsock is None:
            raise SnapshotError(
                f"{where}: the guest has no vsock device; --vsock cannot add one to a snapshot"
            )
        if given.vsock.vhost != saved.vsock.vhost:
            kind = "vhost=on" if saved.vsock.vhost else "path=SOCK"
            raise SnapshotError(f"{where}: the guest's vsock was {kind}; restore it with the same kind")
        config = dataclasses.replace(config, vsock=given.vsock)
    if given.console is not None:
        if saved.console is None:
            raise SnapshotError(f"{where}: the guest has no virtio console; --virtio-console cannot add one")
        config = dataclasses.replace(config, console=given.console)
    return config


__all__ = ["Overrides", "apply_overrides", "config_from_map", "config_to_map"]
