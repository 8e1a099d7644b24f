"""``evmm jail``'s pure parts: the spec and its command line, what goes into the root, the cgroup files, the
root's mount points and its removal.  (The namespaces, mounts and uid drop run in the linux tier:
tests/linux/test_confine.py.)"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from evmm.cli import jail_cmd
from evmm.config.devspec import VsockSpec
from evmm.confine import jail
from evmm.confine.cgroup import Limits, cgroup2_mount, check_limits
from evmm.confine.jail import JailSpec, check_id, jail_argv, outside, plan, run_config, sockets
from evmm.confine.jailer import _mirror, _remove_tree
from evmm.errors import ConfigError, EvmmError


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    jail_cmd.register(parser.add_subparsers())
    return parser.parse_args(["jail", *argv])


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    from evmm.assets import default_guest

    try:
        return default_guest().vmlinux
    except EvmmError:
        pytest.skip("no default guest built (evmm assets)")


def test_the_command_line_makes_the_spec_and_the_spec_the_command_line(tmp_path: Path) -> None:
    args = _args(
        ["--id", "vm1", "--uid", "1000", "--gid", "100", "--base", str(tmp_path), "--cpu-max", "0.5",
         "--memory-max", "512M", "--pids-max", "32", "--io-weight", "200", "--netns", "new",
         "--keep-fd", "5", "--rlimit", "nofile=128", "--", "--memory", "256M"]
    )  # fmt: skip
    spec = jail_cmd.spec_from_args(args)
    assert spec.limits == Limits(cpus=0.5, memory=512 << 20, pids=32, io_weight=200)
    assert (spec.id, spec.uid, spec.gid, spec.netns, spec.keep_fds) == ("vm1", 1000, 100, "new", (5,))
    assert dict(spec.rlimits) == {"core": 0, "nofile": 128}
    assert spec.run_args == ("--memory", "256M")
    again = jail_cmd.spec_from_args(_args(jail_argv(spec)[4:]))
    assert again == spec


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--uid", "1", "--gid", "1"], "--id is required"),
        (["--id", "x", "--gid", "1"], "--uid and --gid are required"),
        (["--id", "x", "--uid", "1", "--gid", "1", "--rlimit", "stack=1"], "--rlimit 'stack=1'"),
    ],
)
def test_bad_command_lines_are_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        jail_cmd.spec_from_args(_args(argv))


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "-x"])
def test_jail_ids_are_plain_names(bad: str) -> None:
    with pytest.raises(ConfigError, match="jail id"):
        check_id(bad)


def test_limits_become_cgroup_files() -> None:
    files = Limits(cpus=0.25, memory=1 << 30, pids=100, io_weight=10).files()
    assert files == {
        "cpu.max": "25000 100000",
        "memory.max": str(1 << 30),
        "memory.swap.max": "0",
        "pids.max": "100",
        "io.weight": "default 10",
    }
    assert Limits().files() == {} and Limits().controllers() == []
    with pytest.raises(ConfigError, match="--memory-max"):
        check_limits(Limits(memory=1 << 20))


def test_the_cgroup2_mount_is_found_in_mountinfo() -> None:
    info = (
        "24 1 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "35 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount(info) == Path("/sys/fs/cgroup/unified")
    with pytest.raises(EvmmError, match="no cgroup v2"):
        cgroup2_mount("24 1 0:22 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n")


def test_the_plan_holds_the_vms_files_the_interpreter_and_nothing_else(tmp_path: Path, kernel: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    sock = tmp_path / "s" / "api.sock"
    spec = JailSpec("p", 1, 1, ("--kernel", str(kernel), "--drive", f"path={disk}", "--api-sock", str(sock)))
    p = plan(spec, cwd=tmp_path)
    assert kernel in p.readonly and p.writable == (disk,)
    assert p.socket_dirs == (sock.parent,)
    assert p.devices == ("kvm", "null", "zero", "urandom")
    assert Path(sys.base_prefix).resolve() in p.readonly
    import evmm

    assert Path(evmm.__file__).parent.resolve() in p.readonly
    # Host libraries one by one, never /usr or /etc whole; no other checkout file.
    assert not {Path("/usr"), Path("/usr/lib"), Path("/etc"), Path("/")} & set(p.readonly)
    assert all(not str(x).startswith(str(Path(evmm.__file__).parents[1] / "tests")) for x in p.readonly)
    assert p.argv[1:] == ("-s", "-m", "evmm", "run", *spec.run_args)  # nothing defaulted: --kernel given
    env = dict(p.env)
    assert env["PYTHONPATH"] == str(Path(evmm.__file__).resolve().parents[1])
    assert "HOME" not in env


def test_a_tap_and_vhost_bring_their_device_nodes(kernel: Path) -> None:
    spec = JailSpec(
        "p", 1, 1, ("--kernel", str(kernel), "--hotplug", "net=1,vhost=off", "--vsock", "cid=3,vhost=on")
    )
    assert plan(spec).devices[-2:] == ("net/tun", "vhost-vsock")


@pytest.mark.parametrize(
    ("net", "host_has_it", "wanted"),
    [
        ("tap=t0,vhost=on", False, True),  # asked for: the jail fails to make it, with a line naming it
        ("tap=t0,vhost=off", True, False),
        ("tap=t0", True, True),  # unset: where the host has it, as evmm run outside a jail
        ("tap=t0", False, False),
    ],
)
def test_a_vhost_net_nic_brings_dev_vhost_net(
    kernel: Path, monkeypatch: pytest.MonkeyPatch, net: str, host_has_it: bool, wanted: bool
) -> None:
    monkeypatch.setattr(jail, "host_has_device", lambda name: host_has_it and name == "vhost-net")
    devices = plan(JailSpec("p", 1, 1, ("--kernel", str(kernel), "--net", net))).devices
    assert devices[:5] == ("kvm", "null", "zero", "urandom", "net/tun")
    assert ("vhost-net" in devices) == wanted


def test_shared_directories_are_bound_writable_or_read_only(tmp_path: Path, kernel: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    args = ("--kernel", str(kernel), "--fs", f"path={rw},tag=a", "--fs", f"path={ro},tag=b,readonly=on")
    p = plan(JailSpec("p", 1, 1, args), cwd=tmp_path)
    assert p.writable == (rw,)
    assert ro in p.readonly and rw not in p.readonly


def test_a_pty_console_is_refused_in_one_line(kernel: Path) -> None:
    with pytest.raises(ConfigError, match=r"^jail: --virtio-console pty: the jail has no /dev/pts"):
        plan(JailSpec("p", 1, 1, ("--kernel", str(kernel), "--virtio-console", "pty")))


def test_the_sockets_the_vmm_listens_on_are_named(tmp_path: Path, kernel: Path) -> None:
    args = ("--kernel", str(kernel), "--api-sock", "/r/api.sock", "--vsock", "cid=3,path=/v/v.sock")
    assert sockets([*args, "--virtio-console", "/c/hvc.sock"]) == [
        Path("/r/api.sock"),
        Path("/v/v.sock"),
        Path("/c/hvc.sock"),
    ]
    assert run_config(args).vsock == VsockSpec(cid=3, path=Path("/v/v.sock"))


def test_bad_run_arguments_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    spec = JailSpec("p", 1, 1, ("--kernel", str(tmp_path / "nope")), base=tmp_path / "jails")
    with pytest.raises(ConfigError, match="no such file"):
        plan(spec)
    assert not (tmp_path / "jails").exists()


def test_mount_points_follow_symlinks_as_the_host_does(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "usr" / "lib").mkdir(parents=True)
    (host / "usr" / "lib" / "libx.so.1.2").write_bytes(b"x")
    os.symlink("usr/lib", host / "lib")
    os.symlink("libx.so.1.2", host / "usr" / "lib" / "libx.so.1")
    root = tmp_path / "root"
    root.mkdir()
    resolved = _mirror(root, host / "lib" / "libx.so.1")
    assert resolved == host / "usr" / "lib" / "libx.so.1.2"
    inside = root / str(host).lstrip("/")
    assert os.readlink(inside / "lib") == "usr/lib"
    assert os.readlink(inside / "usr" / "lib" / "libx.so.1") == "libx.so.1.2"
    assert (inside / "usr" / "lib" / "libx.so.1.2").read_bytes() == b""  # a mount point, not a copy


def test_outside_is_where_the_host_finds_a_jails_socket(tmp_path: Path) -> None:
    spec = JailSpec("vm", 1, 1, (), base=tmp_path)
    assert outside(spec, "/run/api.sock") == tmp_path / "vm" / "root" / "run" / "api.sock"
    with pytest.raises(ConfigError):
        outside(spec, "api.sock")


def test_removal_takes_the_whole_tree_and_follows_no_symlink(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("x")
    jail = tmp_path / "jail"
    (jail / "root" / "a" / "b").mkdir(parents=True)
    (jail / "root" / "a" / "b" / "f").write_text("")
    os.symlink(precious, jail / "root" / "link")
    _remove_tree(jail)
    assert not jail.exists()
    assert (precious / "keep").read_text() == "x"
