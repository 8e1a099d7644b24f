"""``evmm run`` under its default ``--seccomp kill``, driven through the control channel on this host's KVM.

The rest of the kvm tier builds boards directly, with no filter; here a real evmm process wears all of them
while every control method that needs no booted Linux runs: a call some thread's list lacks kills evmm
(exit ``EXIT_SECCOMP``, a stderr line naming the call), which the test would see at once.  The guest is an
ELF "kernel" that halts with interrupts off: it asks nothing of evmm, and the vCPU sleeps in KVM.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.control import Client, ControlError
from evmm.errors import EvmmError
from evmm.exitcodes import EXIT_SECCOMP
from tests.unit.test_loader import elf64

ROOT = Path(__file__).resolve().parents[2]
KERNEL_AT = 0x100000
HALT = bytes.fromhex("f4ebfd")  # 1: hlt; jmp 1b
START_TIMEOUT = 20.0
KILLED = "made a forbidden system call"


class Evmm:
    def __init__(self, tmp: Path, *args: str) -> None:
        kernel = tmp / "halt.elf"
        kernel.write_bytes(elf64([(KERNEL_AT, HALT, 0x1000)], KERNEL_AT))
        self.sock = tmp / "api.sock"
        self.stderr = tmp / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if k not in ("EVMM_SECCOMP", "EVMM_TEST_HOOKS")}
        cmd = [sys.executable, "-m", "evmm", "run", "--allow-slow-kvm", "--kernel", str(kernel)]
        cmd += ["--api-sock", str(self.sock), "--memory", "128M", *args]
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )

    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def alive(self, after: str) -> None:
        code = self.proc.poll()
        assert code is None, f"evmm exited {code} after {after}: {self.errors()}"

    async def connect(self) -> Client:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.sock.exists():
            self.alive("start-up")
            assert time.monotonic() < deadline, (
                f"no control socket after {START_TIMEOUT:g} s: {self.errors()}"
            )
            await asyncio.sleep(0.05)
        return await Client(self.sock).connect()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def evmm(tmp_path: Path) -> Iterator[Callable[..., Evmm]]:
    started: list[Evmm] = []

    def start(*args: str) -> Evmm:
        started.append(Evmm(tmp_path, *args))
        return started[-1]

    yield start
    for e in started:
        e.close()


Step = tuple[str, dict[str, Any], Callable[[Any], object] | str]  # method, params, check of result or error


async def drive(vm: Evmm, steps: list[Step]) -> None:
    """Each method in turn; after each, evmm must still run (a seccomp kill would have ended it)."""
    client = await vm.connect()
    try:
        # The control socket listens before the vCPUs start (and the main filter goes on): wait for them.
        deadline = time.monotonic() + START_TIMEOUT
        while (await client.call("query-status"))["state"] == "created":
            assert time.monotonic() < deadline, f"the VM did not start: {vm.errors()}"
            await asyncio.sleep(0.02)
        for method, params, check in [("subscribe", {}, lambda r: r["state"] == "running"), *steps]:
            try:
                result = await client.call(method, params)
            except ControlError as e:
                assert isinstance(check, str) and re.search(check, str(e)), f"{method}: {e}"
            except EvmmError as e:  # the connection is gone: say why evmm ended
                vm.proc.wait(START_TIMEOUT)
                pytest.fail(f"{method}: {e}; evmm exited {vm.proc.returncode}: {vm.errors()}")
            else:
                assert not isinstance(check, str), f"{method} answered {result}, expected an error"
                assert check(result) is not False, f"{method} answered {result}"
            vm.alive(method)
        await client.call("quit")
    finally:
        await client.close()
    code = await asyncio.get_running_loop().run_in_executor(None, vm.proc.wait, START_TIMEOUT)
    assert KILLED not in vm.errors()
    assert code == 0, f"evmm exited {code} (seccomp kill: {EXIT_SECCOMP}): {vm.errors()}"


def common(snapshot: Path, saved: Callable[[Any], object] | str) -> list[Step]:
    return [
        ("query-status", {}, lambda r: r["running"]),
        ("query-vm", {}, lambda r: r["vcpus"]),
        ("query-commands", {}, lambda r: len(r) > 10),
        ("console-resize", {"rows": 40, "cols": 120}, lambda r: r["rows"] == 40),
        ("pause", {}, lambda r: r["state"] == "paused"),
        ("snapshot", {"dir": str(snapshot)}, saved),
        ("resume", {}, lambda r: r["state"] == "running"),
        ("shutdown", {"method": "acpi"}, lambda r: r["method"] == "acpi"),  # the halted guest ignores it
    ]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_every_control_method_on_a_confined_microvm(evmm: Callable[..., Evmm], tmp_path: Path) -> None:
    snapshot, disk = tmp_path / "snap", tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vm = evmm("--hotplug", "blk=1")

    def saved(r: dict[str, Any]) -> bool:
        return r["memory_size"] == 128 << 20 and (snapshot / "memory").stat().st_size == 128 << 20

    run(
        drive(
            vm,
            [
                *common(snapshot, saved),
                ("query-hotplug", {}, lambda r: r["slots"][0]["id"] == "hp-blk0"),
                ("device-replace", {"slot": "hp-blk0", "path": str(disk)}, lambda r: r["backend"]),
                ("device-remove", {"slot": "hp-blk0"}, lambda r: not r.get("backend")),
            ],
        )
    )


@pytest.fixture
def tap() -> Iterator[str]:
    """A tap for device-add to open (made as root, as the kvm tier runs; removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("making a tap needs root")
    name = f"evkvm{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", name, "mode", "tap"], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def test_every_control_method_on_a_confined_standard_board(
    evmm: Callable[..., Evmm], tmp_path: Path, tap: str
) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    for disk in (first, second):
        disk.write_bytes(bytes(1 << 20))
    vm = evmm("--machine", "standard", "--drive", f"path={first}")
    run(
        drive(
            vm,
            [
                *common(tmp_path / "snap", "only the microvm board can be snapshotted"),
                ("query-pci", {}, lambda r: len(r["devices"]) >= 1),
                ("device-add", {"kind": "blk", "id": "extra", "path": str(second)}, lambda r: r),
                ("query-pci", {}, lambda r: "extra" in str(r)),
                # A NIC where the board started with none: device-add loads evmm's net device then, after
                # the filter went on (evmm/confine/preload.py loads it first).
                ("device-add", {"kind": "net", "id": "nic", "tap": tap}, lambda r: r["bdf"]),
                # The halted guest never ejects it: the request stands, and evmm goes on.
                ("device-del", {"id": "extra", "timeout": 1}, "did not eject extra within 1 s"),
            ],
        )
    )


def filtered(pid: int) -> None:
    """Wait until the main thread wears its role's filter: its second (the first refuses io_uring)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        if int(status.split("Seccomp_filters:")[1].split()[0]) >= 2:
            return
        time.sleep(0.05)
    pytest.fail(f"evmm's main thread has no filter after {START_TIMEOUT:g} s")


def test_the_escape_menu_on_a_confined_terminal(tmp_path: Path) -> None:
    """With a person at the terminal, Ctrl-] opens the menu, whose status line rich draws (imported before
    the filter goes on, evmm.confine.preload); then q quits."""
    kernel = tmp_path / "halt.elf"
    kernel.write_bytes(elf64([(KERNEL_AT, HALT, 0x1000)], KERNEL_AT))
    env = {k: v for k, v in os.environ.items() if k not in ("EVMM_SECCOMP", "EVMM_TEST_HOOKS")}
    cmd = [
        sys.executable,
        "-m",
        "evmm",
        "run",
        "--allow-slow-kvm",
        "--kernel",
        str(kernel),
        "--memory",
        "64M",
    ]
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(ROOT)
        os.execve(sys.executable, cmd, env)
    out = bytearray()

    def until(text: bytes, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out.extend(os.read(fd, 4096))
                except OSError:  # the child is gone
                    break
        assert text in out, f"no {text!r} on the terminal: {bytes(out)!r}"

    try:
        filtered(pid)  # the menu must open under the main filter, or it proves nothing
        os.write(fd, b"\x1dm")
        until(b"running")
        os.write(fd, b"\x1dq")
        until(b"the VM is stopping")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert KILLED.encode() not in out
    assert os.waitstatus_to_exitcode(status) == 0, bytes(out)
