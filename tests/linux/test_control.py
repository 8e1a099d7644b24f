"""The control plane against a real guest (issue 5, "Done means"): ``evmm run --api-sock`` / ``--qmp``.

- pause/resume: a guest printing a counter stops advancing while paused (watched for 2.5 s), and goes on after
  resume;
- shutdown: the guest is asked (ACPI power button, or Ctrl-Alt-Del) and powers off cleanly, exit 0;
- hot-replace (``--hotplug blk=N``): a disk put into an empty slot is read by the guest with the right
  contents, and a replacement image shows its new size;
- QMP through the independent ``qemu.qmp`` client: stop/cont/quit, a hot-replace, and the events.

Each test also prints the control latencies it measured (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.assets import GuestAssets
from evmm.control import Client
from evmm.exitcodes import EXIT_GUEST_POWEROFF, EXIT_GUEST_RESET
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, Guest, evmm_run_argv

BOOT_TIMEOUT = 120.0
MiB = 1 << 20
TICK = re.compile(r"tick-(\d+)\n")
# Prints a counter forever; the quotes keep the echoed command line from looking like a tick.
TICKER = "(i=0; while :; do i=$((i+1)); echo tick-''$i; sleep 0.3; done) &"


@pytest.fixture
def workdir() -> Iterator[Path]:
    # /tmp: inside the KVM test host the host root is read-only; short, for Unix socket paths.
    with tempfile.TemporaryDirectory(prefix="evmm-ctl-", dir="/tmp") as d:
        yield Path(d)


def boot(launch: GuestFactory, assets: GuestAssets, name: str, *extra: str) -> Guest:
    guest = launch([*evmm_run_argv(assets.vmlinux, assets.initramfs), *extra], name)
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    return guest


def wait_for_socket(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def call(sock: Path, method: str, /, **params: Any) -> Any:
    async def once() -> Any:
        async with Client(sock) as c:
            return await c.call(method, params)

    return asyncio.run(once())


def timed(sock: Path, method: str, /, **params: Any) -> tuple[Any, float]:
    """One call on an open connection, and its round trip in ms (connecting is not counted)."""

    async def once() -> tuple[Any, float]:
        async with Client(sock) as c:
            t = time.perf_counter()
            answer = await c.call(method, params)
            return answer, (time.perf_counter() - t) * 1000

    return asyncio.run(once())


def latencies(sock: Path, rounds: int = 10) -> str:
    """Median round trips of query-status, pause (all vCPUs parked) and resume, in ms."""

    async def measure() -> str:
        got: dict[str, list[float]] = {"query-status": [], "pause": [], "resume": []}
        async with Client(sock) as c:
            for _ in range(rounds):
                for method in got:
                    t = time.perf_counter()
                    await c.call(method)
                    got[method].append((time.perf_counter() - t) * 1000)
        return ", ".join(f"{m} {statistics.median(v):.2f} ms" for m, v in got.items())

    return asyncio.run(measure())


def last_tick(guest: Guest) -> int:
    ticks = [int(n) for n in TICK.findall(guest.log)]
    return max(ticks) if ticks else 0


def assert_frozen(guest: Guest, seconds: float = 2.5) -> int:
    """Console output the guest wrote before parking may still be on its way: settle, then watch."""
    time.sleep(0.5)
    frozen = last_tick(guest)
    time.sleep(seconds)
    assert last_tick(guest) == frozen, f"the counter moved while paused: {frozen} -> {last_tick(guest)}"
    return frozen


def test_pause_freezes_the_guest_and_resume_continues(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    sock = workdir / "api.sock"
    guest = boot(launch, guest_assets, "evmm-ctl-pause", "--api-sock", str(sock), "--cpus", "2")
    wait_for_socket(sock)
    guest.sendline(TICKER)
    guest.expect(TICK, 60)
    guest.expect(TICK, 60)
    status, rtt = timed(sock, "query-status")
    assert status == {"state": "running", "running": True}
    answer, pause_ms = timed(sock, "pause")
    assert answer == {"state": "paused"}
    vm = call(sock, "query-vm")
    assert vm["state"] == "paused" and [v["state"] for v in vm["vcpus"]] == ["paused", "paused"]
    frozen = assert_frozen(guest)
    answer, resume_ms = timed(sock, "resume")
    assert answer == {"state": "running"}
    guest.expect(re.compile(rf"tick-{frozen + 1}\n"), 60)
    guest.expect(TICK, 60)
    print(
        f"\nreal guest, first calls: query-status {rtt:.2f} ms, pause {pause_ms:.2f} ms, resume {resume_ms:.2f} ms"
    )
    print(f"real guest, medians of 10: {latencies(sock)}")
    guest.sendline("kill %1")
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def test_shutdown_by_acpi_power_button_powers_off(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    sock = workdir / "api.sock"
    guest = boot(launch, guest_assets, "evmm-ctl-acpi", "--api-sock", str(sock))
    # The default guest binds the power button (PNP0C0C) and runs acpid to act on it.
    guest.check("test -d /sys/bus/acpi/drivers/button && pidof acpid")
    assert call(sock, "shutdown") == {"method": "acpi"}
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def test_shutdown_by_ctrl_alt_del_powers_off(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    sock = workdir / "api.sock"
    guest = boot(launch, guest_assets, "evmm-ctl-cad", "--api-sock", str(sock))
    # The default guest's init powers off on Ctrl-Alt-Del (Firecracker's SendCtrlAltDel means "shut down").
    assert call(sock, "shutdown", method="ctrl-alt-del") == {"method": "ctrl-alt-del"}
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def image(path: Path, size: int, marker: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(marker.encode())
    return path


def wait_for_disk(guest: Guest, sectors: int, timeout: float = 60.0) -> str:
    """The guest's virtio disk whose size is ``sectors`` (0: gone or empty), waited for in the guest."""
    script = (
        f"for i in $(seq {int(timeout * 5)}); do for d in /sys/block/vd*; do "
        f'[ -e "$d" ] && [ "$(cat $d/size)" = {sectors} ] && echo "disk=${{d##*/}}" && exit 0; done; '
        "sleep 0.2; done; exit 1"
    )
    out, status = guest.run(f"sh -c '{script}'", timeout + 30)
    if sectors == 0 and status != 0:  # no vd* device at all is an empty slot as well
        return ""
    assert status == 0, f"no virtio disk of {sectors} sectors appeared: {out}"
    m = re.search(r"disk=(\w+)", out)
    assert m is not None
    return m.group(1)


def read_marker(guest: Guest, disk: str, length: int) -> str:
    # iflag=direct: past the page cache, which may hold the previous image's blocks.
    return guest.check(f"dd if=/dev/{disk} bs=4096 count=1 iflag=direct 2>/dev/null | head -c {length}")


def test_hot_replace_into_an_empty_slot(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    sock = workdir / "api.sock"
    guest = boot(launch, guest_assets, "evmm-ctl-hotplug", "--api-sock", str(sock), "--hotplug", "blk=1")
    slots = call(sock, "query-hotplug")["slots"]
    blk = [s for s in slots if s["kind"] == "blk"]
    assert blk and not blk[0]["occupied"], slots
    slot = blk[0]["id"]
    wait_for_disk(guest, 0)
    first = image(workdir / "first.img", 4 * MiB, "evmm-first-disk")
    filled = call(sock, "device-replace", slot=slot, path=str(first), readonly=True)
    assert filled["occupied"] and filled["backend"]
    disk = wait_for_disk(guest, 4 * MiB // 512)
    assert read_marker(guest, disk, 15) == "evmm-first-disk"
    # A bigger image in the same slot: the guest sees the new size and the new contents.
    second = image(workdir / "second.img", 12 * MiB, "evmm-second-disk")
    call(sock, "device-replace", slot=slot, path=str(second))
    disk = wait_for_disk(guest, 12 * MiB // 512)
    assert read_marker(guest, disk, 16) == "evmm-second-disk"
    call(sock, "device-remove", slot=slot)
    wait_for_disk(guest, 0)
    assert call(sock, "reset") == {}
    assert guest.wait_exit(60) == EXIT_GUEST_RESET


def test_qmp_stop_cont_hot_replace_quit(
    launch: GuestFactory, guest_assets: GuestAssets, workdir: Path
) -> None:
    from qemu.qmp import QMPClient

    qmp_path = workdir / "qmp.sock"
    guest = boot(
        launch, guest_assets, "evmm-qmp", "--qmp", f"unix:{qmp_path},server,nowait", "--hotplug", "blk=1"
    )
    guest.sendline(TICKER)
    guest.expect(TICK, 60)
    disk_image = image(workdir / "qmp.img", 8 * MiB, "evmm-qmp-disk")

    async def drive() -> list[str]:
        qmp = QMPClient("evmm-linux-test")
        await qmp.connect(str(qmp_path))
        seen: list[str] = []

        async def event(name: str) -> dict[str, Any]:
            while True:
                ev = await asyncio.wait_for(qmp.events.get(), 60)
                seen.append(str(ev["event"]))
                if ev["event"] == name:
                    return dict(ev)

        t = time.perf_counter()
        await qmp.execute("stop")
        stop_ms = (time.perf_counter() - t) * 1000
        await event("STOP")
        assert (await qmp.execute("query-status"))["status"] == "paused"  # type: ignore[index]
        frozen = await asyncio.to_thread(assert_frozen, guest)
        await qmp.execute("cont")
        await event("RESUME")
        await asyncio.to_thread(guest.expect, re.compile(rf"tick-{frozen + 1}\n"), 60)
        await asyncio.to_thread(guest.sendline, "kill %1")
        node = {"driver": "file", "filename": str(disk_image)}
        await qmp.execute(
            "blockdev-add", {"node-name": "d1", "driver": "raw", "file": node, "read-only": True}
        )
        await qmp.execute("device_add", {"driver": "virtio-blk-device", "drive": "d1", "id": "disk1"})
        disk = await asyncio.to_thread(wait_for_disk, guest, 8 * MiB // 512)
        assert await asyncio.to_thread(read_marker, guest, disk, 13) == "evmm-qmp-disk"
        block = await qmp.execute("query-block")
        assert [b["inserted"]["file"] for b in block if "inserted" in b] == [str(disk_image)]  # type: ignore[attr-defined]
        await qmp.execute("device_del", {"id": "disk1"})
        deleted = await event("DEVICE_DELETED")
        assert deleted["data"]["device"] == "disk1"
        await qmp.execute("quit")
        shutdown = await event("SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        # The VMM closes the connection after quit, as QEMU does; when that EOF reaches qemu.qmp before
        # disconnect() does, disconnect() re-raises it (qemu.machine ignores EOFError once quit was issued).
        with contextlib.suppress(EOFError):
            await qmp.disconnect()
        print(f"\nreal guest, QMP: stop answered in {stop_ms:.2f} ms")
        return seen

    seen = asyncio.run(drive())
    assert {"STOP", "RESUME", "DEVICE_DELETED", "SHUTDOWN"} <= set(seen)
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
    assert not qmp_path.exists()
    assert "Traceback" not in guest.log  # evmm's exit with the QMP client still connected is quiet


def test_a_bad_qmp_spec_is_one_line(guest_assets: GuestAssets) -> None:
    argv = [*evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs), "--qmp", "tcp:localhost:4444"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ}, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "evmm: --qmp 'tcp:localhost:4444': only unix:PATH,server,nowait is supported"
    )
