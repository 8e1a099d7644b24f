"""Hot-replace slots without a VM: what each kind accepts, and the errors a control client sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.devices.virtio.blk import VirtioBlk
from evmm.devices.virtio.net import VirtioNet
from evmm.errors import ConfigError
from evmm.machine.hotplug import HotplugSlot, make_empty_blk, make_empty_net


def test_an_empty_net_slot_has_a_fixed_mac_and_no_link() -> None:
    a, b = make_empty_net("hotnet0", 0), make_empty_net("hotnet1", 1)
    assert isinstance(a, VirtioNet) and isinstance(b, VirtioNet)
    assert not a.link_up and a.mac != b.mac and a.mac[0] == 0x52
    again = make_empty_net("hotnet0", 0)
    assert isinstance(again, VirtioNet) and a.mac == again.mac  # the same slot, the same MAC, every run


def test_a_net_slot_refuses_another_mac_and_disk_images() -> None:
    slot = HotplugSlot("hotnet0", "net", make_empty_net("hotnet0", 0))
    with pytest.raises(ConfigError, match=r"its MAC is 52:54:00:.*fixed at boot"):
        slot.fill(NetSpec(tap="evx0", mac="52:54:00:aa:bb:cc"))
    with pytest.raises(ConfigError, match="takes a tap"):
        slot.fill(DriveSpec(path=Path("/dev/null")))
    with pytest.raises(ConfigError, match="already empty"):
        slot.empty()
    assert slot.backend is None


def test_a_blk_slot_takes_an_image_and_gives_it_back(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    slot = HotplugSlot("hotblk0", "blk", make_empty_blk("hotblk0"))
    with pytest.raises(ConfigError, match="takes a disk image"):
        slot.fill(NetSpec(tap="evx0"))
    slot.fill(DriveSpec(path=image, readonly=True))
    assert slot.describe() == {"id": "hotblk0", "kind": "blk", "occupied": True, "backend": str(image)}
    assert isinstance(slot.device, VirtioBlk)
    slot.empty()
    assert not slot.describe()["occupied"]
    with pytest.raises(ConfigError, match="no such file"):
        slot.fill(DriveSpec(path=tmp_path / "missing.img"))
    assert slot.backend is None  # a failed fill leaves the slot as it was
