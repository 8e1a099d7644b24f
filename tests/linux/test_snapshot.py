"""Snapshot and restore of a running guest (issue 17, "Done means"), driven through its serial console.

The guest runs a counter, has a disk with an ext2 file system on it, a NIC on a tap (in a network namespace
of the test's, as in test_virtio_net) and a vsock device with an echo service listening.  It is paused,
saved (``snapshot`` on the control channel) and quit; ``evmm run --restore`` brings it back in a new VMM:
the counter goes on from where it was, the file reads back from the disk (page cache dropped), the console
answers, the NIC pings the host again, the vsock service answers a new connection, and the guest's wall
clock was moved on by the time the VM spent as a snapshot.  Then the restored VM is saved and restored
again.  Errors: a corrupted, truncated or other-version snapshot, a missing drive: one line each, exit 1.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from evmm.assets import GuestAssets
from evmm.netns import ip, unavailable
from evmm.netns import netns as evmm_netns
from evmm.snapshot.format import MAGIC, STATE_FILE
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, Guest, evmm_run_argv
from tests.linux.test_control import call, wait_for_socket
from tests.linux.test_virtio_net import GUEST_IP, HOST_IP, MAC, host_ping, host_side
from tests.linux.test_virtio_vsock import hybrid_connect

BOOT_TIMEOUT = 300.0
RESTORE_TIMEOUT = 120.0
CMD_TIMEOUT = 120.0  # a shell command in a guest of a busy test host (30 s was seen to be too short)
CID = 42
PORT = 7000
MiB = 1 << 20
WALL_CLOCK_GAP = 20.0  # seconds between a snapshot and its restore, for the clock correction to show
FILE_TEXT = "written before the snapshot"
# A counter in a file, not on the console: its lines would land in the middle of the commands' output.
COUNTER = "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.3; done) &"

needs_netns = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # /tmp: the test host's root is read-only; short, for Unix socket paths (<path>_<port> included).
    with tempfile.TemporaryDirectory(prefix="evmm-snap-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def netns() -> Iterator[str]:
    with evmm_netns("evmm-snap") as name:
        yield name


def ext2_image(path: Path, size: int = 16 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", str(path)], check=True, capture_output=True)
    return path


def evmm(*args: str) -> list[str]:
    return [sys.executable, "-m", "evmm", *args]


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def devices(work: Path, tap: str) -> list[str]:
    return [
        *("--drive", f"path={work / 'disk.img'}"),
        *("--net", f"tap={tap},mac={MAC},vhost=off"),  # a snapshot holds no vhost-net NIC
        *("--vsock", f"cid={CID},path={work / 'v.sock'}"),
    ]


def count(guest: Guest) -> int:
    return int(guest.check("cat /tmp/count", timeout=CMD_TIMEOUT).strip())


def snapshot(guest: Guest, sock: Path, directory: Path) -> tuple[int, dict[str, object]]:
    """Pause, save to ``directory``, quit; the counter just before the pause and the snapshot's answer."""
    tick = count(guest)
    call(sock, "pause")
    info = call(sock, "snapshot", dir=str(directory))
    call(sock, "quit")
    assert guest.wait_exit(60) == 0
    return tick, info


def restore(
    launch: GuestFactory, ns: str, work: Path, directory: Path, tap: str, name: str, sock: Path
) -> Guest:
    argv = in_ns(ns, evmm("run", "--restore", str(directory), *devices(work, tap), "--api-sock", str(sock)))
    return launch(argv, name)


def vsock_echo(work: Path, payload: bytes) -> bytes:
    s = hybrid_connect(work / "v.sock", PORT, timeout=60)
    with s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def check_alive(guest: Guest, ns: str, work: Path, since_tick: int) -> None:
    """Counter, console, disk, network and vsock of a restored guest."""
    assert guest.check("echo console-$((6 * 7))", timeout=CMD_TIMEOUT).strip() == "console-42"
    tick = count(guest)
    assert since_tick <= tick < since_tick + 200, f"the counter went from {since_tick} to {tick}"
    deadline = time.monotonic() + 30
    while count(guest) == tick:  # and it still runs
        assert time.monotonic() < deadline, f"the counter stopped at {tick}"
        time.sleep(0.5)
    assert (
        guest.check("echo 3 > /proc/sys/vm/drop_caches; head -n 1 /mnt/file", timeout=CMD_TIMEOUT).strip()
        == FILE_TEXT
    )
    out = guest.check(f"ping -c 2 -W 5 {HOST_IP}", timeout=CMD_TIMEOUT)
    assert "2 packets received" in out, out
    assert host_ping(ns, GUEST_IP, count=2) == 2
    payload = hashlib.sha256(str(tick).encode()).hexdigest().encode()
    assert vsock_echo(work, payload) == payload


@needs_netns
@pytest.mark.cost(600)
def test_snapshot_restore_twice_keeps_processes_disk_network_vsock_and_console(
    netns: str, launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    if not guest_assets.tools_initramfs.is_file():
        pytest.skip("the tools initramfs (socat) was not built")
    tap = "evsnap0"
    # A persistent tap, as a host that restores VMs keeps them: it outlives each VMM with its address and MAC,
    # so the guest's neighbour entry for the host is still right after a restore.
    ip("-n", netns, "tuntap", "add", "dev", tap, "mode", "tap")
    host_side(netns, tap)
    ext2_image(workdir / "disk.img")
    sock = workdir / "api.sock"
    argv = in_ns(
        netns,
        [
            *evmm_run_argv(guest_assets.vmlinux, guest_assets.tools_initramfs, memory="512M"),
            *devices(workdir, tap),
            *("--api-sock", str(sock)),
        ],
    )
    guest = launch(argv, "evmm-snap-boot")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    wait_for_socket(sock)
    nic = next(n for n in guest.check("ls /sys/class/net", timeout=CMD_TIMEOUT).split() if n != "lo")
    guest.check(f"ip addr add {GUEST_IP}/24 dev {nic} && ip link set {nic} up", timeout=CMD_TIMEOUT)
    assert "1 packets received" in guest.check(f"ping -c 1 -W 5 {HOST_IP}", timeout=CMD_TIMEOUT)
    guest.check(f"mount /dev/vda /mnt && echo '{FILE_TEXT}' > /mnt/file && sync", timeout=CMD_TIMEOUT)
    guest.sendline(f"socat VSOCK-LISTEN:{PORT},fork,reuseaddr EXEC:cat &")
    payload = b"before the snapshot"
    assert vsock_echo(workdir, payload) == payload
    guest.sendline(COUNTER)
    guest.check("sleep 3", timeout=CMD_TIMEOUT)
    assert count(guest) > 3

    first = workdir / "snap1"
    tick, info = snapshot(guest, sock, first)
    saved_at = time.time()
    assert info["memory_size"] == 512 * MiB
    assert 0 < int(info["memory_written"]) < 512 * MiB  # type: ignore[call-overload]
    on_disk = sum(p.stat().st_blocks * 512 for p in first.iterdir())
    print(f"\nsnapshot: {info}, {on_disk / MiB:.1f} MiB on disk")
    time.sleep(max(0.0, WALL_CLOCK_GAP - (time.time() - saved_at)))

    sock2 = workdir / "api2.sock"
    restored = restore(launch, netns, workdir, first, tap, "evmm-snap-restore-1", sock2)
    check_alive(restored, netns, workdir, tick)
    asked = time.time()
    said = int(restored.check("date +%s", timeout=CMD_TIMEOUT).strip())
    answered = time.time()
    assert asked - 2 <= said <= answered + 2, (
        f"the guest's clock says {said}, asked at {asked:.0f} and answered at {answered:.0f}, "
        f"after {WALL_CLOCK_GAP:g} s as a snapshot"
    )
    restored.check("echo after the first restore >> /mnt/file && sync", timeout=CMD_TIMEOUT)

    # Snapshot -> restore -> snapshot -> restore: the restored VM's RAM is itself a MAP_PRIVATE file.
    second = workdir / "snap2"
    tick2, _ = snapshot(restored, sock2, second)
    again = restore(launch, netns, workdir, second, tap, "evmm-snap-restore-2", workdir / "api3.sock")
    check_alive(again, netns, workdir, tick2)
    assert again.check("tail -n 1 /mnt/file", timeout=CMD_TIMEOUT).strip() == "after the first restore"
    again.sendline("poweroff")
    assert again.wait_exit(60) == 0


# ---- refusals: one line, exit 1 --------------------------------------------------------------------------


def small_snapshot(directory: Path, guest_assets: GuestAssets, launch: GuestFactory, *extra: str) -> None:
    """A small real snapshot to damage: a 128 MiB guest (with ``extra`` options), saved after its ready line."""
    sock = directory.parent / f"{directory.name}.sock"
    argv = [*evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, memory="128M"), *extra]
    guest = launch([*argv, "--api-sock", str(sock)], f"evmm-snap-{directory.name}")
    guest.expect(READY, BOOT_TIMEOUT)
    wait_for_socket(sock)
    call(sock, "pause")
    call(sock, "snapshot", dir=str(directory))
    call(sock, "quit")
    assert guest.wait_exit(60) == 0


def refused(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evmm: "), r.stderr
    return lines[0]


HEADER = struct.Struct("<8sIQ32s")  # evmm/snapshot/format.py


def read_body(state: Path) -> dict[str, object]:
    body: dict[str, object] = msgpack.unpackb(
        state.read_bytes()[HEADER.size :], raw=False, strict_map_key=False
    )
    return body


def reseal_with(state: Path, **changes: object) -> None:
    """Change the body and write a valid checksum: only the check under test can refuse it."""
    body = {**read_body(state), **changes}
    payload = msgpack.packb(body, use_bin_type=True)
    state.write_bytes(HEADER.pack(MAGIC, 1, len(payload), hashlib.sha256(payload).digest()) + payload)


def test_damaged_foreign_and_incomplete_snapshots_are_one_line_each(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    good = workdir / "good"
    small_snapshot(good, guest_assets, launch)

    def variant(name: str) -> Path:
        d = workdir / name
        shutil.copytree(good, d)
        return d

    corrupt = variant("corrupt")
    data = bytearray((corrupt / STATE_FILE).read_bytes())
    data[200] ^= 0xFF
    (corrupt / STATE_FILE).write_bytes(bytes(data))
    assert re.search(r"corrupted", refused(evmm("run", "--restore", str(corrupt))))

    truncated = variant("truncated")
    (truncated / STATE_FILE).write_bytes((truncated / STATE_FILE).read_bytes()[:-100])
    assert re.search(r"truncated", refused(evmm("run", "--restore", str(truncated))))

    short_memory = variant("short-memory")
    with open(short_memory / "memory", "r+b") as f:
        f.truncate(64 * MiB)
    assert re.search(
        r"memory: \d+ bytes, the snapshot's guest RAM is",
        refused(evmm("run", "--restore", str(short_memory))),
    )

    other = variant("other-version")
    reseal_with(other / STATE_FILE, evmm="0.0.1")
    assert "made by evmm 0.0.1" in refused(evmm("run", "--restore", str(other)))

    other_cpu = variant("other-cpu")
    vcpus = read_body(other_cpu / STATE_FILE)["vcpus"]
    assert isinstance(vcpus, list)
    for v in vcpus:  # claim AVX-512 foundation was offered to the guest (leaf 7, EBX bit 16)
        v["cpuid"] = [[*e[:4], e[4] | (1 << 16), *e[5:]] if e[:2] == [7, 0] else e for e in v["cpuid"]]
    reseal_with(other_cpu / STATE_FILE, vcpus=vcpus)
    line = refused(evmm("run", "--restore", str(other_cpu)))
    if "lacks: avx512f" not in line:
        assert "made on" not in line, line  # this host has AVX-512F: then the claim restores fine, skip it
        pytest.skip(f"this host's KVM offers avx512f, the feature the test claims: {line}")

    with_disk = workdir / "with-disk"
    image = ext2_image(workdir / "d.img", 4 * MiB)
    small_snapshot(with_disk, guest_assets, launch, "--drive", f"path={image}")
    image.unlink()
    assert f"disk blk0 was {image}, which does not exist" in refused(evmm("run", "--restore", str(with_disk)))
    other_size = ext2_image(workdir / "other.img", 8 * MiB)
    line = refused(evmm("run", "--restore", str(with_disk), "--drive", f"path={other_size}"))
    assert "has 16384 sectors; the guest's disk had 8192" in line, line
