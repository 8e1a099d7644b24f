"""The host API (``evmm.sandbox``) against a fake agent (tests/fakes/agent.py), on asyncio's loop and uvloop.

What the host must do by itself: route events that arrive before ``exec``'s answer is read, grant credit
so that never more than one window of a stream waits on the host, keep stdin writes within their window,
fail every pending call and process cleanly when the agent goes away, check file transfers, reach the agent
through the hybrid vsock handshake (retrying while the guest boots), and run a ``Sandbox`` whose VMM is a
fake ``evmm run`` (a control socket over a fake machine, a fake agent behind a hybrid vsock socket).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop

from evmm.errors import EvmmError
from evmm.rpc.protocol import Event
from evmm.sandbox import AgentClient, Container, ExecSpec, Mount, Rlimit, Sandbox, User
from evmm.sandbox.process import MAX_CHUNK, STDIN_WINDOW
from evmm.sandbox.spec import environment
from tests.fakes.agent import FakeAgent

FAKE_EVMM = (sys.executable, "-m", "tests.fakes.agent")


# Every async test runs on asyncio's loop and on uvloop (tests/unit/conftest.py).
LOOP_KINDS = ("asyncio", "uvloop")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evmm-sbt-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
async def fake(sockdir: Path) -> AsyncIterator[FakeAgent]:
    agent = await FakeAgent(sockdir / "agent.sock").start()
    yield agent
    await agent.close()


@pytest.fixture
async def client(fake: FakeAgent) -> AsyncIterator[AgentClient]:
    c = await AgentClient.unix(fake.path)
    yield c
    await c.close()


# ---- processes ----------------------------------------------------------------------------------------


async def test_exec_output_and_exit(client: AgentClient) -> None:
    p = await client.exec(ExecSpec(("echo", "hello", "there")))
    assert await p.stdout.read() == b"hello there\n"
    assert (await p.wait()).code == 0
    p = await client.exec(ExecSpec(("fail", "3")))
    assert await p.stderr.read() == b"failing\n" and await p.stdout.read() == b""
    status = await p.wait()
    assert (status.code, status.returncode) == (3, 3)


async def test_events_that_come_before_the_exec_answer_is_read_are_kept(client: AgentClient) -> None:
    # An output and the exit for a pid the client has not registered yet (its exec answer was in the same
    # read): they wait, and reach the process once it is registered.
    client._on_event(Event("output", {"pid": 4242, "stream": "stdout", "data": b"early"}, time.time()))
    client._on_event(Event("exit", {"pid": 4242, "code": 5, "signal": None}, time.time()))
    from evmm.sandbox.process import Process

    p = client._register(Process(4242, send=client.send, stdin=False))
    assert await p.stdout.read() == b"early"
    assert (await p.wait()).code == 5


async def test_the_host_never_holds_more_than_a_window_and_grants_credit_as_it_reads(
    client: AgentClient, fake: FakeAgent
) -> None:
    window = 64 << 10
    p = await client.exec(ExecSpec(("flood", str(5 << 20)), window=window))
    await asyncio.sleep(0.3)
    assert p.stdout.buffered == window  # the fake waits for credit: the reader has taken nothing
    got = 0
    async for chunk in p.stdout:
        got += len(chunk)
        assert p.stdout.buffered <= window
        await asyncio.sleep(0)  # a slow reader
    assert got == 5 << 20
    assert fake.max_unacked <= window
    credits = [r for m, r in fake.requests if m == "credit"]
    assert credits and all(c["bytes"] >= window // 2 for c in credits)


async def test_stdin_writes_wait_for_their_answers_beyond_a_window(
    client: AgentClient, fake: FakeAgent
) -> None:
    p = await client.exec(ExecSpec(("cat",), stdin=True))
    assert p.stdin is not None
    fake.stdin_gate.clear()  # the agent answers no stdin write for now
    writer = asyncio.ensure_future(p.stdin.write(b"z" * (4 << 20)))
    await asyncio.sleep(0.3)
    assert not writer.done()
    sent = sum(len(r["data"]) for m, r in fake.requests if m == "stdin")
    assert STDIN_WINDOW < sent <= STDIN_WINDOW + MAX_CHUNK
    fake.stdin_gate.set()
    reader = asyncio.ensure_future(p.stdout.read())
    await writer
    await p.stdin.close()
    assert len(await reader) == 4 << 20


async def test_losing_the_agent_fails_every_pending_call_and_process(
    client: AgentClient, fake: FakeAgent
) -> None:
    p = await client.exec(ExecSpec(("sleep",)))
    pending = client.send("exec", ExecSpec(("sleep",)).to_wire())
    await asyncio.sleep(0)
    fake.hang_up()
    with pytest.raises(EvmmError, match=r"^process \d+: .*agent connection"):
        await p.wait()
    with pytest.raises(EvmmError, match=r"^stdout: .*agent connection"):
        await p.stdout.read()
    with pytest.raises(EvmmError):
        await pending
    with pytest.raises(EvmmError):
        await client.exec(ExecSpec(("echo",)))


async def test_a_signal_reaches_the_process(client: AgentClient) -> None:
    p = await client.exec(ExecSpec(("sleep",)))
    await p.signal("TERM")
    assert (await p.wait()).signal == 15
    assert (await p.wait()).returncode == 143


# ---- files ---------------------------------------------------------------------------------------------


async def test_files_round_trip_in_chunks(client: AgentClient, fake: FakeAgent) -> None:
    data = os.urandom((3 << 20) + 5)
    await client.files.write("/tmp/x", data, mode=0o600)
    assert fake.files["/tmp/x"] == data
    writes = [r for m, r in fake.requests if m == "file-write"]
    assert len(writes) == 13 and all(len(w["data"]) <= 256 << 10 for w in writes)
    assert await client.files.read("/tmp/x") == data


async def test_a_read_whose_crc_does_not_match_fails(client: AgentClient, fake: FakeAgent) -> None:
    fake.files["/f"] = b"data"
    fake.corrupt_reads = True
    with pytest.raises(EvmmError, match=r"/f: the agent read 4 bytes \(CRC-32"):
        await client.files.read("/f")


async def test_a_missing_file_is_file_not_found(client: AgentClient) -> None:
    with pytest.raises(FileNotFoundError, match="No such file"):
        await client.files.read("/nope")
    assert not await client.files.exists("/nope")


async def test_list_follows_the_pages(client: AgentClient, fake: FakeAgent) -> None:
    fake.list_page = 3
    for i in range(10):
        fake.files[f"/d/f{i}"] = b""
    assert sorted(e.name for e in await client.files.list("/d")) == [f"f{i}" for i in range(10)]
    assert sum(1 for m, _ in fake.requests if m == "list") == 4


# ---- connecting ----------------------------------------------------------------------------------------


async def test_hybrid_vsock_handshake_and_a_port_nobody_serves(sockdir: Path) -> None:
    fake = await FakeAgent(sockdir / "v.sock", hybrid=True, port=1024).start()
    try:
        c = await AgentClient.hybrid(fake.path, 1024)
        await c.ping()
        await c.close()
        with pytest.raises(EvmmError, match="nothing listens on guest vsock port 1025"):
            await AgentClient.hybrid(fake.path, 1025)
    finally:
        await fake.close()


async def test_connect_when_ready_waits_for_the_guest(sockdir: Path) -> None:
    path = sockdir / "v.sock"

    async def boot_later() -> FakeAgent:
        await asyncio.sleep(0.5)
        return await FakeAgent(path, hybrid=True).start()

    booting = asyncio.ensure_future(boot_later())
    c = await AgentClient.connect_when_ready(path, timeout=10)
    await c.ping()
    await c.close()
    await (await booting).close()
    with pytest.raises(EvmmError, match="the VMM exited before the agent answered"):
        await AgentClient.connect_when_ready(sockdir / "none", timeout=10, alive=lambda: False)
    with pytest.raises(EvmmError, match=r"did not answer within 0.3 s"):
        await AgentClient.connect_when_ready(sockdir / "none", timeout=0.3)


# ---- what exec sends ------------------------------------------------------------------------------------


def test_exec_parameters_on_the_wire() -> None:
    spec = ExecSpec(
        ("sh", "-c", "x"),
        env=environment({"A": "1"}, tty=True),
        user=User.parse("1000:100"),
        rlimits=(Rlimit("RLIMIT_NOFILE", 10, 20),),
        tty=True,
        rows=30,
        container=Container("/rootfs", (Mount("/proc", "proc", "proc"),), hostname="box"),
    )
    wire = spec.to_wire()
    assert wire["env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "TERM=xterm",
        "A=1",
    ]
    assert (wire["uid"], wire["gid"], wire["groups"], wire["rows"]) == (1000, 100, [], 30)
    assert wire["rlimits"] == [{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 20}]
    assert wire["container"] == {
        "rootfs": "/rootfs",
        "mounts": [{"target": "/proc", "type": "proc", "source": "proc", "options": []}],
        "namespaces": ["mount", "uts", "ipc", "pid"],
        "readonly_root": False,
        "hostname": "box",
    }
    assert "cols" not in wire and "join" not in wire
    assert environment(["X=1"], tty=False) == ("X=1",)
    with pytest.raises(EvmmError, match="--user 'root': expected UID"):
        User.parse("root")
    with pytest.raises(EvmmError, match="namespace 'user'"):
        Container("/r", namespaces=("user",)).to_wire()


# ---- Sandbox with a fake evmm run ---------------------------------------------------------------------


def fake_sandbox(**kw: object) -> Sandbox:
    return Sandbox(kernel="/fake/vmlinux", command=FAKE_EVMM, boot_timeout=30, **kw)  # type: ignore[arg-type]


async def test_sandbox_boots_runs_pauses_and_stops_its_vmm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VMM_BOOT", "0.5")
    box = fake_sandbox(memory="128M", drives=["path=/d.img"], extra_args=["--fs", "path=/srv,tag=t"])
    async with box:
        assert box._vmm is not None
        argv = (await asyncio.to_thread(Path(f"/proc/{box._vmm.proc.pid}/cmdline").read_bytes)).split(b"\0")
        assert b"--drive" in argv and b"path=/d.img" in argv and b"--fs" in argv and b"128M" in argv
        r = await box.run(["echo", "hi"])
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"hi\n", b"")
        await box.pause()
        await box.resume()
        workdir, proc = box._vmm.workdir, box._vmm.proc
    assert proc.returncode == 0  # quit over the control socket
    assert not workdir.exists()


async def test_a_vmm_that_fails_to_start_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VMM_FAIL", "1")
    with pytest.raises(EvmmError, match=r"^sandbox: evmm run exited 1: --kernel /nope: no such file$"):
        async with fake_sandbox():
            pass


async def test_attach_finds_the_agent_through_query_vm() -> None:
    async with fake_sandbox() as owner:
        assert owner.api_sock is not None
        box = await Sandbox.attach(owner.api_sock)
        assert (await box.run(["echo", "attached"])).stdout == b"attached\n"
        await box.close()
        assert owner._vmm is not None and owner._vmm.running  # the attached sandbox left the VM alone
        assert (await owner.run(["echo", "still"])).stdout == b"still\n"


async def test_run_times_out_and_kills_the_process() -> None:
    async with fake_sandbox() as box:
        with pytest.raises(TimeoutError):
            await box.run(["sleep"], timeout=0.3)


def test_evmm_sandbox_is_imported_only_when_used() -> None:
    # `import evmm` happens for every command, and `evmm run`'s start-up counts (docs/performance.md).
    code = (
        "import sys, evmm, evmm.cli.main as m; m.build_parser(['run']); "
        "assert 'evmm.sandbox' not in sys.modules, 'imported early'; "
        "from evmm import Sandbox; assert Sandbox.__module__ == 'evmm.sandbox.sandbox'"
    )
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


async def test_each_async_test_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert request.node.name.endswith("[uvloop]" if on_uvloop else "[asyncio]")
