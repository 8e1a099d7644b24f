"""Confinement against a real guest (issue 19): a forbidden system call stopping evmm with its line and exit
code, and ``evmm jail`` (namespaces, pivot_root, cgroup v2 limits, a dropped uid) running a guest, hiding
the host, containing a memory hog and cleaning up after a SIGKILL.  Every other linux test runs with the
default ``--seccomp kill`` and so checks that the filters allow what the devices need."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.assets import GuestAssets
from evmm.confine.cgroup import Cgroup, Limits
from evmm.confine.jail import JailSpec, cleanup, jail_argv, outside
from evmm.control import Client
from evmm.exitcodes import EXIT_GUEST_POWEROFF, EXIT_SECCOMP
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, evmm_run_argv

BOOT_TIMEOUT = 240.0  # a boot takes 5-20 s in a quiet test host; seen over 120 s on a loaded machine
UID = GID = 65534  # nobody / nogroup
ROOT = Path(__file__).resolve().parents[2]
HOOKS = ("env", "EVMM_TEST_HOOKS=1")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evmm-confine-", dir="/tmp") as d:
        yield Path(d)


def call(sock: Path, method: str, /, **params: Any) -> Any:
    async def once() -> Any:
        async with Client(sock) as c:
            return await c.call(method, params)

    return asyncio.run(once())


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("thread", ["main", "io"])
def test_a_forbidden_system_call_stops_evmm_with_one_line_and_exit_159(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path, thread: str
) -> None:
    """From the reactor itself, and from an I/O worker (whose filter is stacked on the reactor's)."""
    sock = workdir / "api.sock"
    argv = [*HOOKS, *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs), "--api-sock", str(sock)]
    guest = launch(argv, f"seccomp-{thread}")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    assert guest.check("echo filtered-and-fine").strip() == "filtered-and-fine"
    # The VMM ends inside the call, so the client sees its connection drop, not an answer.
    with contextlib.suppress(Exception):
        call(sock, "test-forbidden-syscall", thread=thread, call="execve")
    assert guest.wait_exit(30) == EXIT_SECCOMP
    # stderr and the console share the pipe: the line may follow the guest's prompt on the same line.
    found = re.findall(
        rf"evmm: seccomp: thread \S+ \(role {thread}, tid \d+\) made a forbidden system call: "
        r"execve\(0x[0-9a-f]+(?:, 0x[0-9a-f]+){5}\); stopping the VM\n",
        guest.log,
    )
    assert len(found) == 1, guest.log[-2000:]
    assert guest.log.count("evmm: seccomp:") == 1


_made: list[JailSpec] = []


@pytest.fixture(autouse=True)
def remove_jails() -> Iterator[None]:
    """A failed test leaves no jail behind (its guest is killed first, by the launch fixture)."""
    yield
    while _made:
        spec = _made.pop()
        cleanup(spec.id, spec.base, spec.cgroup_parent)


def jail_spec(workdir: Path, assets: GuestAssets, name: str, limits: Limits, *extra: str) -> JailSpec:
    run = evmm_run_argv(assets.vmlinux, assets.initramfs)
    spec = JailSpec(
        id=f"{name}-{os.getpid()}",
        uid=UID,
        gid=GID,
        run_args=(*run[run.index("run") + 1 :], *extra),
        base=workdir / "jails",
        cgroup_parent="evmm-test",
        limits=limits,
    )
    _made.append(spec)
    return spec


def test_a_jailed_evmm_runs_its_guest_under_its_limits_and_sees_nothing_of_the_host(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    disk = workdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    os.chown(disk, UID, GID)  # the jailed VMM opens it as UID, as Firecracker's jailer requires too
    sock = workdir / "api.sock"
    limits = Limits(cpus=1.5, memory=384 << 20, pids=64, io_weight=50)
    spec = jail_spec(
        workdir, guest_assets, "jailed", limits, "--drive", f"path={disk}", "--rng", "--api-sock", str(sock)
    )
    guest = launch([*HOOKS, *jail_argv(spec)], "jailed")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)

    cgroup = Cgroup.for_jail(spec.cgroup_parent, spec.id)
    assert (cgroup.path / "memory.max").read_text().strip() == str(384 << 20)
    assert (cgroup.path / "cpu.max").read_text().strip() == "150000 100000"
    assert (cgroup.path / "pids.max").read_text().strip() == "64"
    assert (cgroup.path / "io.weight").read_text().split() == ["default", "50"]
    assert cgroup.pids(), "the VMM is not in its cgroup"

    host_sock = outside(spec, sock)
    wait_for(host_sock)
    hidden = [
        "/etc",
        "/etc/passwd",
        "/home",
        "/var",
        "/usr/bin",
        "/bin",
        "/sys",
        "/work/main",
        str(ROOT / "tests"),
        str(ROOT / "README.md"),
        str(workdir / "jails"),
        "/dev/sda",
        "/dev/mem",
    ]
    shown = [
        "/dev/kvm",
        "/dev/null",
        str(disk),
        str(guest_assets.vmlinux),
        str(guest_assets.initramfs),
        sys.executable,
    ]
    info = call(host_sock, "test-inspect", paths=hidden + shown)
    assert (info["uid"], info["gid"], info["groups"]) == (UID, GID, [])
    assert info["pid"] == 1  # PID 1 of its own PID namespace
    assert info["hostname"] == spec.id
    assert [p for p in hidden if info["paths"][p]] == []
    assert [p for p in shown if not info["paths"][p]] == []

    # Its devices work in there: the disk (a worker thread's filter stacked on the reactor's) and the rng.
    guest.check("echo jailed-disk | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null", timeout=120)
    assert disk.read_bytes()[:11] == b"jailed-disk"
    assert guest.check("head -c 32 /dev/hwrng | wc -c", timeout=120).strip() == "32"
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
    assert not spec.dir.exists() and not cgroup.path.exists()


@pytest.mark.cost(90)
def test_a_memory_hog_guest_is_killed_by_its_jails_memory_max_not_the_host(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    spec = jail_spec(workdir, guest_assets, "hog", Limits(memory=256 << 20), "--memory", "768M")
    guest = launch(jail_argv(spec), "hog")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    guest.sendline("dd if=/dev/zero of=/hog bs=1M count=640")  # the initramfs is RAM: every page is evmm's
    assert guest.wait_exit(300) == 128 + signal.SIGKILL
    assert re.search(rf"evmm jail {spec.id}: the kernel OOM-killed \d+ process", guest.log), guest.log[-1500:]
    assert not spec.dir.exists()
    # The host (this test host) is fine: it goes on running this test, and its kernel blamed the cgroup.
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    assert "Memory cgroup out of memory" in dmesg


def test_jail_cleanup_removes_what_a_killed_jail_left(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    sock = workdir / "api.sock"
    spec = jail_spec(workdir, guest_assets, "killed", Limits(pids=64), "--api-sock", str(sock))
    guest = launch(jail_argv(spec), "killed")
    wait_for(outside(spec, sock), BOOT_TIMEOUT)
    cgroup = Cgroup.for_jail(spec.cgroup_parent, spec.id)
    os.kill(guest.pid, signal.SIGKILL)  # the supervisor: no clean-up of its own
    guest.wait_exit(30)
    deadline = time.monotonic() + 30
    while cgroup.pids() and time.monotonic() < deadline:  # the VMM follows its supervisor (PDEATHSIG)
        time.sleep(0.1)
    assert cgroup.pids() == []
    assert spec.dir.exists() and cgroup.path.exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "evmm",
            "jail",
            "--cleanup",
            spec.id,
            "--base",
            str(spec.base),
            "--cgroup-parent",
            spec.cgroup_parent,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert not spec.dir.exists() and not cgroup.path.exists()
    assert f"removed {cgroup.path}" in r.stdout


ROUNDS = 500
# The rng's platform device (its virtio device has id 4), its register window from /proc/iomem.
FIND_RNG = (
    "for v in /sys/bus/virtio/devices/*; do [ $(cat $v/device) = 0x0004 ] && "
    "basename $(dirname $(readlink -f $v)); done"
)


@pytest.mark.cost(150)
def test_a_hostile_guest_driver_costs_only_its_device(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    """evmm-hostile (evmm/assets/hostile.c) takes the virtio-rng device from its driver and, through /dev/mem,
    writes random and boundary values to its registers, brings it up with rings in its own pages or at
    hostile addresses, fills those rings with garbage and kicks.  evmm keeps running and the disk, the
    console and the control channel keep working."""
    disk = workdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 << 20)
    sock = workdir / "api.sock"
    argv = [
        *evmm_run_argv(guest_assets.vmlinux, guest_assets.tools_initramfs, memory="512M"),
        *("--drive", f"path={disk}", "--rng", "--api-sock", str(sock)),
    ]
    guest = launch(argv, "hostile")
    guest.expect(READY, 3 * BOOT_TIMEOUT)  # the tools initramfs unpacks 120 MB: minutes in a loaded test host
    guest.expect(PROMPT, 30)
    rng = guest.check(FIND_RNG, timeout=120).strip()
    assert rng.startswith("LNRO0005:"), rng
    base = guest.check(f"grep -m1 '{rng}' /proc/iomem", timeout=120).split("-")[0].strip()
    guest.check(f"echo {rng} > /sys/bus/platform/drivers/virtio-mmio/unbind", timeout=120)
    # Each round is a few MMIO exits served by the reactor: 3000 rounds ran past 300 s in a loaded test host.
    for seed in (1, 2, 3):
        out = guest.check(f"evmm-hostile 0x{base} {ROUNDS} {seed}", timeout=600)
        assert f"evmm-hostile: {ROUNDS} rounds" in out
    # Still here, and the other devices work.
    guest.check(
        "echo after-the-attack | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null", timeout=120
    )
    assert disk.read_bytes()[:16] == b"after-the-attack"
    assert guest.check("echo console-ok", timeout=120).strip() == "console-ok"
    assert call(sock, "query-status")["state"] == "running"
    assert "Traceback" not in guest.log
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
