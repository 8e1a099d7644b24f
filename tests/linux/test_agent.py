"""The guest agent in a real guest (issue 14, "Done means"), through ``evmm.Sandbox``: 100 sequential runs,
8 concurrent execs, exit codes 0, 1, 255 and a SIGKILL death, a missing program, 64 MiB of stdout streamed
and checksummed, 64 MiB of stdin into sha256sum, a 64 MiB file round trip, and the housekeeping methods.

The tests of this module share one VM (booting is the slow part in the KVM test host).  ``linux_sandbox`` is
also what the other agent test modules use: a guest that crashes under a test (seen in the test host, not of
evmm's making) is ``GuestKernelCrash``, which the tier reruns once, and a failing test carries the VM's
console log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from evmm.errors import EvmmError
from evmm.exitcodes import EXIT_TRIPLE_FAULT
from evmm.sandbox import Sandbox
from tests.linux.harness import KERNEL_CRASH, GuestKernelCrash, kernel_args

BOOT_TIMEOUT = 180.0
BIG = 64 << 20
pytestmark = pytest.mark.asyncio(loop_scope="module")


class _ConsoleLog:
    """What tests/conftest.py attaches to a failing test's report: a name, an argv and the console text."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.argv = ["evmm.Sandbox", name]

    @property
    def log(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        except OSError as e:
            return f"(no console log: {e})"


def _crashed(box: Sandbox, log: Path) -> bool:
    vmm = box._vmm
    text = _ConsoleLog("", log).log
    return bool(KERNEL_CRASH.search(text)) or (vmm is not None and vmm.proc.returncode == EXIT_TRIPLE_FAULT)


@contextlib.asynccontextmanager
async def linux_sandbox(node: Any, name: str, **options: Any) -> AsyncIterator[Sandbox]:
    """A started ``Sandbox`` on the default guest (quiet console), its console log kept for the report."""
    log = Path(f"/tmp/evmm-{name}-{os.getpid()}.log")
    node.evmm_guests = [*getattr(node, "evmm_guests", []), _ConsoleLog(name, log)]
    box = Sandbox(append=kernel_args(), boot_timeout=BOOT_TIMEOUT, console_log=log, **options)
    try:
        await box.start()
    except EvmmError as e:
        if _crashed(box, log) or f"exited {EXIT_TRIPLE_FAULT}" in str(e):
            raise GuestKernelCrash(f"{name}: the guest crashed while booting: {e}") from None
        raise
    try:
        yield box
    except EvmmError as e:
        if box._vmm is not None and not box._vmm.running and _crashed(box, log):
            raise GuestKernelCrash(f"{name}: the guest crashed under the test: {e}") from None
        raise
    finally:
        await box.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def box(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    async with linux_sandbox(request.node, "agent", memory="512M") as b:
        yield b


class _ModuleLogs:
    """The shared VM's console log, found on the module when a test's report is made."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __iter__(self) -> Iterator[_ConsoleLog]:
        return iter(getattr(self.module, "evmm_guests", []))


@pytest.fixture(autouse=True)
def _report_console(request: pytest.FixtureRequest) -> None:
    request.node.evmm_guests = _ModuleLogs(request.node.parent)


async def test_100_sequential_runs(box: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    for i in range(100):
        r = await box.run(["echo", str(i)])
        assert (r.exit_code, r.stdout) == (0, f"{i}\n".encode())
    with capsys.disabled():
        print(f"\nagent: 100 sequential runs of echo in {time.monotonic() - started:.1f} s")


async def test_8_concurrent_execs(box: Sandbox) -> None:
    procs = [await box.exec(["sh", "-c", f"read go; echo {i}; exit {i}"], stdin=True) for i in range(8)]
    running = [p for p in await box.agent.processes() if p["yours"] and not p["exited"]]
    assert len(running) == 8  # all at once: each waits for its go
    for p in procs:
        assert p.stdin is not None
        await p.stdin.write(b"go\n")
    outs = await asyncio.gather(*(p.stdout.read() for p in procs))
    assert outs == [f"{i}\n".encode() for i in range(8)]
    assert [(await p.wait()).code for p in procs] == list(range(8))


@pytest.mark.parametrize(
    ("script", "code", "signal"),
    [("exit 0", 0, None), ("exit 1", 1, None), ("exit 255", 255, None), ("kill -KILL $$", None, 9)],
)
async def test_exit_codes_and_a_sigkill_death(
    box: Sandbox, script: str, code: int | None, signal: int | None
) -> None:
    r = await box.run(["sh", "-c", script])
    assert (r.exit_code, r.signal) == (code, signal)


async def test_a_missing_program_is_127(box: Sandbox) -> None:
    r = await box.run(["evmm-no-such-program", "x"])
    assert (r.exit_code, r.stderr) == (127, b"evmm-no-such-program: command not found\n")


def _sha(text: bytes) -> str:
    m = re.search(rb"\b([0-9a-f]{64})\b", text)
    assert m is not None, text
    return m.group(1).decode()


@pytest.mark.slow
@pytest.mark.cost(150)
async def test_64mib_of_stdout_streamed_and_checksummed(
    box: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    p = await box.exec(["sh", "-c", f"head -c {BIG} /dev/urandom | tee /tmp/out.bin"])
    h, n = hashlib.sha256(), 0
    async for chunk in p.stdout:
        h.update(chunk)
        n += len(chunk)
    assert (await p.wait()).code == 0
    seconds = time.monotonic() - started
    assert n == BIG
    assert h.hexdigest() == _sha((await box.run(["sha256sum", "/tmp/out.bin"])).stdout)
    await box.files.remove("/tmp/out.bin")
    with capsys.disabled():
        print(f"\nagent: 64 MiB of stdout in {seconds:.1f} s ({BIG / seconds / 1e6:.2f} MB/s)")


@pytest.mark.slow
@pytest.mark.cost(150)
async def test_64mib_of_stdin_into_sha256sum(box: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    data = os.urandom(BIG)
    started = time.monotonic()
    r = await box.run(["sha256sum"], stdin=data)
    seconds = time.monotonic() - started
    assert r.exit_code == 0 and _sha(r.stdout) == hashlib.sha256(data).hexdigest()
    with capsys.disabled():
        print(f"\nagent: 64 MiB of stdin in {seconds:.1f} s ({BIG / seconds / 1e6:.2f} MB/s)")


@pytest.mark.slow
@pytest.mark.cost(200)
async def test_64mib_file_round_trip(box: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    data = os.urandom(BIG)
    started = time.monotonic()
    await box.files.write("/tmp/big", data, mode=0o600)
    up = time.monotonic() - started
    assert _sha((await box.run(["sha256sum", "/tmp/big"])).stdout) == hashlib.sha256(data).hexdigest()
    info = await box.files.stat("/tmp/big")
    assert (info.size, info.mode) == (BIG, 0o600)
    started = time.monotonic()
    assert await box.files.read("/tmp/big") == data
    down = time.monotonic() - started
    await box.files.remove("/tmp/big")
    with capsys.disabled():
        print(f"\nagent: 64 MiB file in {up:.1f} s, back in {down:.1f} s")


async def test_files_and_housekeeping(box: Sandbox) -> None:
    await box.files.mkdir("/tmp/a/b", parents=True)
    await box.files.write("/tmp/a/b/f", b"hello", mode=0o640, uid=1000, gid=1000)
    r = await box.run(["sh", "-c", "stat -c '%a %u %g %s' /tmp/a/b/f"])
    assert r.stdout == b"640 1000 1000 5\n"
    assert [e.name for e in await box.files.list("/tmp/a/b")] == ["f"]
    await box.files.remove("/tmp/a", recursive=True)
    assert not await box.files.exists("/tmp/a")
    await box.agent.set_time(1_900_000_000.5)
    assert int((await box.run(["date", "+%s"])).stdout) in range(1_900_000_000, 1_900_000_060)
    await box.agent.set_time()
    assert abs(int((await box.run(["date", "+%s"])).stdout) - time.time()) < 60
    await box.agent.add_entropy(os.urandom(64))  # RNDADDENTROPY: refused without CAP_SYS_ADMIN
    await box.agent.sync()
