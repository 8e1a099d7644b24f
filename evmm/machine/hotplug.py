"""Hot-replace slots of the microvm board: empty virtio devices reserved at boot whose backends change later.

The microvm board has no hot-plug bus (no PCI, and virtio-mmio devices are fixed in the DSDT), so, as in
StratoVirt's microvm, the board reserves slots: each is a complete virtio-mmio device the guest's driver binds
at boot.  An empty block slot is a disk of zero sectors; filling it swaps in an image and raises a
configuration-change interrupt, and the driver re-reads the capacity (virtio 1.2 §5.2.6.2 and §2.5.2).
Runs on the reactor, which owns the devices.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.devices.virtio.device import VirtioDevice
from evmm.errors import ConfigError
from evmm.record import record


def empty_disk() -> Any:
    """A backend of zero sectors: what an empty block slot presents."""
    from evmm.devices.virtio.blk.backend import FileBackend

    return FileBackend(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), Path("(empty)"), False)


def make_empty_blk(slot_id: str) -> VirtioDevice:
    from evmm.devices.virtio.blk import VirtioBlk

    return VirtioBlk(empty_disk(), serial=slot_id)


def make_empty_net(slot_id: str, index: int, vhost: bool | None = None) -> VirtioDevice:
    """A NIC with its link down and no tap; its MAC is fixed by the slot, so it survives replacements.

    A vhost-net one (one queue pair) where ``vhost`` asks for it or, when None, where /dev/vhost-net opens.
    """
    from evmm.devices.virtio import net

    mac = net.default_mac(NetSpec(tap=slot_id), 100 + index)
    backends = net.open_vhost_net(f"--hotplug slot {slot_id}", vhost, 1)
    return net.VhostNet.empty(mac, backends[0]) if backends else net.VirtioNet.empty(mac)


@record
class HotplugSlot:
    id: str
    kind: str  # "blk" or "net"
    device: VirtioDevice
    backend: str | None = None  # what fills it: an image path or a tap name; None when empty

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "occupied": self.backend is not None,
            "backend": self.backend,
        }

    def fill(self, spec: DriveSpec | NetSpec) -> None:
        if self.kind == "blk":
            if not isinstance(spec, DriveSpec):
                raise ConfigError(f"slot {self.id} takes a disk image (path=...), not a network backend")
            from evmm.devices.virtio.blk import VirtioBlk

            assert isinstance(self.device, VirtioBlk)
            self.device.replace_backend(spec.path, spec.readonly)
            self.backend = str(spec.path)
            return
        if not isinstance(spec, NetSpec):
            raise ConfigError(f"slot {self.id} takes a tap (tap=...), not a disk image")
        from evmm.devices.virtio.net import VhostNet, VirtioNet, open_tap, parse_mac, wrap_tap_fd

        assert isinstance(self.device, VirtioNet | VhostNet)
        if spec.vhost is not None and spec.vhost != isinstance(self.device, VhostNet):
            fixed = "on" if isinstance(self.device, VhostNet) else "off"
            raise ConfigError(f"slot {self.id}: its vhost={fixed} is fixed at boot (--hotplug ...,vhost=)")
        if spec.mac is not None and parse_mac(spec.mac) != self.device.mac:
            # Linux's virtio_net reads the MAC once, at probe; a config change only updates the link state.
            fixed = ":".join(f"{b:02x}" for b in self.device.mac)
            raise ConfigError(f"slot {self.id}: its MAC is {fixed}, fixed at boot; leave mac out")

        if spec.tap is not None:
            tap = open_tap(spec.tap)
        elif spec.fd is not None:
            tap = wrap_tap_fd(spec.fd)
        else:
            raise ConfigError(f"slot {self.id}: give tap=NAME or fd=N")
        self.device.replace_tap(tap)
        self.backend = spec.tap or f"fd {spec.fd}"

    def empty(self) -> None:
        if self.backend is None:
            raise ConfigError(f"slot {self.id} is already empty")
        if self.kind == "blk":
            from evmm.devices.virtio.blk import VirtioBlk

            assert isinstance(self.device, VirtioBlk)
            self.device.replace_with(empty_disk())
        else:
            from evmm.devices.virtio.net import VhostNet, VirtioNet

            assert isinstance(self.device, VirtioNet | VhostNet)
            self.device.replace_tap(None)
        self.backend = None
