"""A snapshot's machine configuration through a map, the host resources a restore may give again and the
changes of board it refuses; the clone planner's names and MACs; ``evmm serve``'s empty machine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from evmm.cli.clone_cmd import ClonePlan, clone_mac, restore_params, tap_name
from evmm.config.devspec import ConsoleSpec, DriveSpec, NetSpec, RngSpec, VsockSpec
from evmm.control.commands import CommandError, Commands
from evmm.errors import EvmmError
from evmm.machine.config import MachineConfig
from evmm.snapshot import served
from evmm.snapshot.config import Overrides, apply_overrides, config_from_map, config_to_map
from evmm.snapshot.format import SnapshotError

CONFIG = MachineConfig(
    kernel=Path("/k/vmlinux"),
    initrd=Path("/k/initrd"),
    cmdline="console=ttyS0 quiet",
    memory=512 << 20,
    cpus=2,
    drives=(DriveSpec(Path("/d/a.img"), False, "root", "SER1"), DriveSpec(Path("/d/b.img"), True)),
    nets=(NetSpec(tap="tap0"),),
    vsock=VsockSpec(42, Path("/run/v.sock")),
    console=ConsoleSpec("socket", Path("/run/hvc.sock")),
    rng=RngSpec(1000),
    hotplug_blk=1,
)
WHERE = "snapshot D"


def through_msgpack(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)


def test_the_configuration_goes_through_a_map_with_each_nics_mac() -> None:
    back = config_from_map(through_msgpack(config_to_map(CONFIG, ["52:54:00:aa:bb:cc"])), WHERE)
    # A snapshot holds no vhost-net NIC (evmm.snapshot.devices.REFUSED): the restored ones are evmm's own.
    assert back == CONFIG.__class__(
        **{
            **CONFIG.__dict__,
            "nets": (NetSpec(tap="tap0", mac="52:54:00:aa:bb:cc", vhost=False),),
            "hotplug_vhost": False,
        }
    )


def test_a_restored_nic_cannot_move_to_vhost_net() -> None:
    saved = config_from_map(through_msgpack(config_to_map(CONFIG, ["52:54:00:aa:bb:cc"])), WHERE)
    with pytest.raises(SnapshotError, match="cannot move to vhost=on"):
        apply_overrides(saved, Overrides(nets=(NetSpec(tap="clone0", vhost=True),)), WHERE)
    out = apply_overrides(saved, Overrides(nets=(NetSpec(tap="clone0"),)), WHERE)
    assert out.nets[0].vhost is False


def test_host_resources_given_again_replace_the_snapshots_in_order() -> None:
    given = Overrides(
        drives=(DriveSpec(Path("/c/a.img")), DriveSpec(Path("/c/b.img"), True)),
        nets=(NetSpec(tap="clone0"),),
        vsock=VsockSpec(43, Path("/run/c.sock")),
    )
    saved = apply_overrides(CONFIG, Overrides(nets=(NetSpec(tap="tap0", mac="52:54:00:00:00:01"),)), WHERE)
    out = apply_overrides(saved, given, WHERE)
    assert [d.path for d in out.drives] == [Path("/c/a.img"), Path("/c/b.img")]
    assert (out.drives[0].id, out.drives[0].serial) == ("root", "SER1")  # the guest's names stay
    assert out.nets == (
        NetSpec(tap="clone0", mac="52:54:00:00:00:01"),
    )  # the MAC the guest knows, unless given
    assert out.vsock == VsockSpec(43, Path("/run/c.sock"))
    assert (out.memory, out.cpus, out.kernel) == (CONFIG.memory, CONFIG.cpus, CONFIG.kernel)
    assert apply_overrides(CONFIG, Overrides(), WHERE) == CONFIG


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            Overrides(drives=(DriveSpec(Path("/x")),)),
            r"the guest has 2 disks; give --drive for each of them, in order, or none \(got 1\)",
        ),
        (
            Overrides(nets=()),
            r"the guest has 1 NICs; give --net for each of them, in order, or none \(got 0\)",
        ),
        (
            Overrides(vsock=VsockSpec(7, vhost=True)),
            r"the guest's vsock was path=SOCK; restore it with the same kind",
        ),
    ],
)
def test_changes_of_board_are_one_line(given: Overrides, message: str) -> None:
    with pytest.raises(SnapshotError, match=rf"^snapshot D: {message}$"):
        apply_overrides(CONFIG, given, WHERE)
    bare = MachineConfig(kernel=Path("/k"))
    with pytest.raises(SnapshotError, match=r"the guest has no vsock device; --vsock cannot add one"):
        apply_overrides(bare, Overrides(vsock=VsockSpec(3, Path("/s"))), WHERE)


def test_clones_get_their_own_macs_and_taps() -> None:
    macs = {clone_mac("/snap", i, 0) for i in range(100)}
    assert len(macs) == 100
    assert all(m.startswith("52:54:00:") and len(m) == 17 for m in macs)  # locally administered, unicast
    assert clone_mac("/snap", 1, 0) == clone_mac("/snap", 1, 0) != clone_mac("/snap", 1, 1)
    assert tap_name(None, "tap0", 3, 0) == "tap0-c3"
    assert tap_name("vm{i}n{j}", None, 2, 1) == "vm2n1"
    with pytest.raises(EvmmError, match=r"--tap: 'a-very-long-tap-name-0' is not a valid interface name"):
        tap_name("a-very-long-tap-name-{i}", None, 0, 0)
    plan = ClonePlan(
        index=1,
        directory=Path("/c/clone-1"),
        sock=Path("/c/clone-1/api.sock"),
        cid=61,
        vsock_path=None,
        taps=("t1a", "t1b"),
        macs=("52:54:00:00:00:01", "52:54:00:00:00:02"),
        drives=(Path("/c/clone-1/disk-a.img"),),
        sources=(Path("/c/snapshot/disk-a.img"),),
    )
    assert restore_params(plan, Path("/c/snapshot")) == {
        "dir": "/c/snapshot",
        "drive": "path=/c/clone-1/disk-a.img",
        "net": "tap=t1a,mac=52:54:00:00:00:01;tap=t1b,mac=52:54:00:00:00:02",
        "vsock": "cid=61,vhost=on",
    }


def test_a_warm_server_is_empty_until_it_has_a_machine() -> None:
    async def scenario() -> None:
        stopped: list[tuple[int, str]] = []
        machine = served.ServedMachine(
            asyncio.get_running_loop(), lambda code, why: stopped.append((code, why))
        )
        commands = Commands(machine)
        served.register(commands, machine, None)
        assert (await commands.call("query-status", client="t")) == {"state": "empty", "running": False}
        with pytest.raises(CommandError, match=r"pause: the VM is empty"):
            await commands.call("pause", client="t")
        with pytest.raises(CommandError, match=r"restore: snapshot /nope: no such directory"):
            await commands.call("restore", {"dir": "/nope"}, client="t")
        with pytest.raises(CommandError, match=r"boot: --memory '3x' is not a size"):
            await commands.call("boot", {"memory": "3x", "kernel": "/dev/null"}, client="t")
        assert machine.state == "empty" and machine.target is None  # a failed request leaves it usable
        await commands.call("quit", client="t")
        assert stopped and stopped[0][0] == 0
        assert {"restore", "boot"} <= {c["name"] for c in commands.schema()}

    asyncio.run(scenario())


def test_specs_in_one_parameter_are_separated_by_semicolons() -> None:
    assert served._specs("path=/a,readonly=on;path=/b") == ["path=/a,readonly=on", "path=/b"]
    assert served._specs(None) == []
