"""PCI hotplug over the control channel (device-add, device-del, query-pci) and QMP (device_add with
virtio-blk-pci / virtio-net-pci, device_del, DEVICE_DELETED), against a fake machine whose guest ejects on
cue."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.control import start_control
from evmm.control.commands import CommandError, Commands
from evmm.control.pci_commands import register_pci_commands
from evmm.errors import ConfigError
from evmm.rpc.protocol import ErrorCode
from tests.fakes.machine import FakeMachine


class FakePciMachine(FakeMachine):
    """A standard board's PCI hotplug: devices by name; the guest ejects a device when ``ejects`` says so."""

    def __init__(self, *, ejects: bool = True) -> None:
        super().__init__(slots=())
        self.ejects = ejects
        self.pci: dict[str, DriveSpec | NetSpec] = {}
        self.requested: list[str] = []

    def pci_add(self, name: str, spec: DriveSpec | NetSpec) -> dict[str, Any]:
        if name in self.pci:
            raise ConfigError(f"a PCI device named {name!r} exists already")
        self.pci[name] = spec
        return {"id": name, "bdf": f"00:{len(self.pci):02x}.0"}

    async def pci_remove(self, name: str, timeout: float) -> dict[str, Any]:
        if name not in self.pci:
            raise ConfigError(f"no PCI device {name!r}")
        self.requested.append(name)
        if not self.ejects:
            await asyncio.wait_for(asyncio.Event().wait(), timeout)
        del self.pci[name]
        self.emit("device-changed", {"slot": name, "action": "removed", "backend": None})
        return {"id": name}

    def pci_topology(self) -> list[dict[str, Any]]:
        return [{"bdf": f"00:{i + 1:02x}.0", "id": name} for i, name in enumerate(self.pci)]


def commands(machine: FakeMachine) -> Commands:
    c = Commands(machine)
    register_pci_commands(c)
    return c


async def test_device_add_del_and_query(tmp_path: Path) -> None:
    machine = FakePciMachine()
    c = commands(machine)
    image = tmp_path / "d.img"
    answer = await c.call(
        "device-add", {"kind": "blk", "id": "d1", "path": str(image), "readonly": True}, client="t"
    )
    assert answer == {"id": "d1", "bdf": "00:01.0"}
    assert machine.pci["d1"] == DriveSpec(path=image, readonly=True)
    await c.call(
        "device-add", {"kind": "net", "id": "n1", "tap": "tap3", "mac": "52:54:00:00:00:07"}, client="t"
    )
    assert machine.pci["n1"] == NetSpec(tap="tap3", mac="52:54:00:00:00:07")
    assert await c.call("query-pci", client="t") == {
        "devices": [{"bdf": "00:01.0", "id": "d1"}, {"bdf": "00:02.0", "id": "n1"}]
    }
    assert await c.call("device-del", {"id": "d1"}, client="t") == {"id": "d1"}
    assert list(machine.pci) == ["n1"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "blk", "id": "x"}, "kind=blk is a disk: give path"),
        ({"kind": "blk", "id": "x", "path": "/a", "tap": "t"}, "kind=blk is a disk: give path"),
        ({"kind": "net", "id": "x", "path": "/a"}, "kind=net is a network: give tap"),
        ({"kind": "net", "id": "x", "tap": "t" * 16}, "is not 1 to 15 characters"),
        ({"kind": "net", "id": "x", "tap": "t", "mac": "53:00:00:00:00:01"}, "is not a unicast MAC"),
        ({"kind": "scsi", "id": "x"}, "kind='scsi' is not one of blk, net"),
        ({"kind": "blk", "path": "/a"}, "parameter 'id' is required"),
    ],
)
async def test_bad_device_add_requests_are_one_line(params: dict[str, Any], message: str) -> None:
    with pytest.raises(CommandError, match=message) as info:
        await commands(FakePciMachine()).call("device-add", params, client="t")
    assert info.value.code == ErrorCode.INVALID_PARAMS and "\n" not in info.value.message


async def test_a_guest_that_does_not_eject_times_out_and_the_device_stays() -> None:
    machine = FakePciMachine(ejects=False)
    c = commands(machine)
    await c.call("device-add", {"kind": "net", "id": "n1", "tap": "tap3"}, client="t")
    with pytest.raises(CommandError, match="did not eject n1 within 1 s; it stays attached") as info:
        await c.call("device-del", {"id": "n1", "timeout": 1}, client="t")
    assert info.value.code == ErrorCode.FAILED
    assert list(machine.pci) == ["n1"] and machine.requested == ["n1"]


async def test_a_machine_without_pci_says_so() -> None:
    c = commands(FakeMachine())
    for method, params in (("query-pci", {}), ("device-del", {"id": "x"})):
        with pytest.raises(CommandError, match=f"{method}: this machine has no PCI bus"):
            await c.call(method, params, client="t")


async def test_device_errors_from_the_machine_are_one_line() -> None:
    c = commands(FakePciMachine())
    with pytest.raises(CommandError, match="device-del: no PCI device 'ghost'") as info:
        await c.call("device-del", {"id": "ghost"}, client="t")
    assert info.value.code == ErrorCode.FAILED


# ---- QMP, with QEMU's driver names and the independent qemu.qmp client ---------------------------------------


@pytest.fixture
async def qmp() -> AsyncIterator[tuple[QMPClient, FakePciMachine]]:
    machine = FakePciMachine()
    with tempfile.TemporaryDirectory(prefix="evmm-qmp-", dir="/tmp") as d:
        path = Path(d) / "qmp.sock"
        close = await start_control(
            machine, None, api_sock=None, qmp=f"unix:{path},server,nowait", commands=commands(machine)
        )
        client = QMPClient("evmm-test")
        await client.connect(str(path))
        yield client, machine
        await client.disconnect()
        await close()


async def test_qmp_hot_adds_and_removes_pci_disks_and_nics(qmp: tuple[QMPClient, FakePciMachine]) -> None:
    client, machine = qmp
    await client.execute("blockdev-add", {"node-name": "n0", "driver": "file", "filename": "/d.img"})
    await client.execute("device_add", {"driver": "virtio-blk-pci", "id": "disk0", "drive": "n0"})
    assert machine.pci["disk0"] == DriveSpec(path=Path("/d.img"), readonly=False)
    await client.execute("netdev_add", {"id": "net0", "type": "tap", "ifname": "tap9"})
    await client.execute("device_add", {"driver": "virtio-net-pci", "id": "nic0", "netdev": "net0"})
    assert machine.pci["nic0"] == NetSpec(tap="tap9")
    with pytest.raises(ExecuteError, match="Node 'n0' is busy"):
        await client.execute("blockdev-del", {"node-name": "n0"})
    assert await client.execute("device_del", {"id": "disk0"}) == {}
    event: dict[str, Any] = dict(await asyncio.wait_for(client.events.get(), 2))
    assert (event["event"], event["data"]) == (
        "DEVICE_DELETED",
        {"device": "disk0", "path": "/machine/peripheral/disk0"},
    )
    await client.execute("blockdev-del", {"node-name": "n0"})  # free again
    with pytest.raises(ExecuteError, match="Device 'disk0' not found"):
        await client.execute("device_del", {"id": "disk0"})
    assert list(machine.pci) == ["nic0"]
