"""evmm-agent's processes, end to end on this host: the real agent (ASan/UBSan build) on a Unix socket,
driven through ``evmm.sandbox.AgentClient``.  Exit codes and signals, ordered output, stdin acknowledged
only once written, flow control both ways (a reader that stops stops the process, and nobody's memory
grows), a pty with resize, clients that leave (their processes go, detached ones stay for ``attach``),
and many processes and clients at once.  Containers need a guest: tests/linux/test_agent_container.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
from pathlib import Path

import pytest

from evmm.errors import EvmmError
from evmm.sandbox import AgentClient, AgentError, ExecSpec, Process
from tests.fakes.agent import HostAgent, host_agent_fixtures

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds evmm-agent")


# Every async test runs on asyncio's loop and on uvloop (tests/unit/conftest.py).
LOOP_KINDS = ("asyncio", "uvloop")


host_agent, client = host_agent_fixtures()


async def run(c: AgentClient, *argv: str, **kw: object) -> tuple[bytes, bytes, Process]:
    p = await c.exec(ExecSpec(tuple(argv), **kw))  # type: ignore[arg-type]
    out, err = await asyncio.gather(p.stdout.read(), p.stderr.read())
    await p.wait()
    return out, err, p


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie not yet reaped by the agent counts as gone; so does one reaped since the kill(2) above.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except (ProcessLookupError, FileNotFoundError):
        return True


async def wait_gone(pid: int, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if gone(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} is still there")


@pytest.mark.parametrize(
    ("script", "code", "sig"),
    [("exit 0", 0, None), ("exit 1", 1, None), ("exit 255", 255, None), ("kill -KILL $$", None, 9)],
)
async def test_exit_codes_and_signals(
    client: AgentClient, script: str, code: int | None, sig: int | None
) -> None:
    _, _, p = await run(client, "sh", "-c", script)
    status = await p.wait()
    assert (status.code, status.signal) == (code, sig)


async def test_output_arrives_in_order_per_stream_then_the_exit(client: AgentClient) -> None:
    out, err, p = await run(client, "sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 3")
    assert out == b"out1\nout2\nout3\n" and err == b"err1\nerr2\nerr3\n"
    assert (await p.wait()).code == 3


async def test_a_missing_program_exits_127_with_a_shell_like_message(client: AgentClient) -> None:
    _, err, p = await run(client, "evmm-no-such-program")
    assert (await p.wait()).code == 127
    assert err == b"evmm-no-such-program: command not found\n"
    _, err, p = await run(client, "/etc/passwd")
    assert (await p.wait()).code == 126 and b"Permission denied" in err


async def test_a_set_up_failure_fails_the_exec_with_one_line(client: AgentClient) -> None:
    with pytest.raises(AgentError, match=r"^exec true: chdir /nonexistent: No such file or directory$"):
        await client.exec(ExecSpec(("true",), cwd="/nonexistent"))


async def test_env_cwd_umask_and_rlimits_reach_the_process(client: AgentClient, tmp_path: Path) -> None:
    from evmm.sandbox import Rlimit

    out, _, _ = await run(
        client,
        "sh",
        "-c",
        "echo $FOO; pwd; umask; ulimit -n",
        env=("FOO=bar", "PATH=/usr/bin:/bin"),
        cwd=str(tmp_path),
        umask=0o027,
        rlimits=(Rlimit("RLIMIT_NOFILE", 77, 77),),
    )
    assert out.split() == [b"bar", str(tmp_path).encode(), b"0027", b"77"]


async def test_stdin_writes_are_answered_and_close_ends_the_input(client: AgentClient) -> None:
    p = await client.exec(ExecSpec(("sha256sum",), stdin=True))
    data = os.urandom(3 << 20)
    assert p.stdin is not None
    await p.stdin.write(data)
    await p.stdin.close()
    out = await p.stdout.read()
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    with pytest.raises(EvmmError, match="closed"):
        await p.stdin.write(b"more")


async def test_stdin_to_a_process_that_closed_it_fails_the_write(client: AgentClient) -> None:
    p = await client.exec(ExecSpec(("sh", "-c", "exec 0<&-; sleep 5"), stdin=True))
    assert p.stdin is not None
    await asyncio.sleep(0.3)
    with pytest.raises(AgentError, match="closed its input"):
        await p.stdin.write(b"x" * 100)
        await p.stdin.drain()
    await p.kill()


async def test_a_reader_that_stops_stops_the_process_and_nothing_grows(
    client: AgentClient, host_agent: HostAgent
) -> None:
    window = 64 << 10
    p = await client.exec(
        ExecSpec(("sh", "-c", "yes evmm-flood | head -c 200000000; echo done >&2"), window=window)
    )
    rss = host_agent.rss_kib()
    await asyncio.sleep(1.0)
    # Nothing read: the host holds at most one window, the agent holds nothing, the process waits.
    assert p.stdout.buffered <= window
    assert host_agent.rss_kib() - rss < 4096
    got = 0
    async for chunk in p.stdout:
        got += len(chunk)
        assert p.stdout.buffered <= window
        if got > 20 << 20:
            break
    assert got > 20 << 20
    await p.kill()


async def test_a_pty_has_the_size_asked_for_and_follows_resize(client: AgentClient) -> None:
    p = await client.exec(
        ExecSpec(
            ("sh", "-c", "stty size; read x; stty size; echo got $x"), tty=True, rows=33, cols=99, stdin=True
        )
    )
    seen = b""
    async for chunk in p.stdout:
        seen += chunk
        if b"33 99" in seen:
            break
    await p.resize(40, 120)
    assert p.stdin is not None
    await p.stdin.write(b"hello\n")
    rest = await p.stdout.read()
    assert b"40 120\r\n" in rest and b"got hello" in rest
    assert await p.stderr.read() == b""  # a terminal merges both


async def test_stdin_close_on_a_pty_is_end_of_file(client: AgentClient) -> None:
    p = await client.exec(ExecSpec(("cat",), tty=True, stdin=True))
    assert p.stdin is not None
    await p.stdin.write(b"abc\n")
    await p.stdin.close()
    out = await p.stdout.read()
    assert (await p.wait()).code == 0 and b"abc" in out


async def test_signals_by_name_and_number_reach_the_process(client: AgentClient) -> None:
    p = await client.exec(
        ExecSpec(("sh", "-c", "trap 'echo term; exit 7' TERM; while :; do sleep 0.05; done"))
    )
    await asyncio.sleep(0.3)
    await p.signal("TERM")
    assert (await p.wait()).code == 7 and await p.stdout.read() == b"term\n"
    p = await client.exec(ExecSpec(("sleep", "30")))
    await p.signal(int(signal.SIGUSR1))
    assert (await p.wait()).signal == signal.SIGUSR1


async def test_a_clients_processes_go_when_it_leaves(host_agent: HostAgent) -> None:
    c = await AgentClient.unix(host_agent.path)
    p = await c.exec(ExecSpec(("sh", "-c", "sleep 100 & echo $!; wait")))
    child = int((await p.stdout.read_chunk() or b"0").strip())
    await c.close()
    await wait_gone(p.pid)
    await wait_gone(child)  # the whole process group


async def test_a_detached_process_stays_and_can_be_attached(host_agent: HostAgent) -> None:
    c = await AgentClient.unix(host_agent.path)
    p = await c.exec(ExecSpec(("sh", "-c", "read x; echo got $x; exit 4"), stdin=True, detach=True))
    await c.close()
    await asyncio.sleep(0.2)
    assert not gone(p.pid)
    c2 = await AgentClient.unix(host_agent.path)
    c3 = await AgentClient.unix(host_agent.path)
    listing = {q["pid"]: q for q in await c2.processes()}
    assert listing[p.pid]["detached"] and not listing[p.pid]["yours"]
    waiter = asyncio.ensure_future(c3.call("wait", {"pid": p.pid}))
    q = await c2.attach(p.pid, stdin=True)
    assert q.stdin is not None
    await q.stdin.write(b"later\n")
    assert await q.stdout.read() == b"got later\n"
    assert (await q.wait()).code == 4
    assert (await waiter)["code"] == 4
    with pytest.raises(AgentError, match="no process"):
        await c2.attach(p.pid)
    await c2.close()
    await c3.close()


async def test_many_processes_and_clients_at_once(host_agent: HostAgent) -> None:
    clients = [await AgentClient.unix(host_agent.path) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(run(c, "sh", "-c", f"echo {i}; exit {i}") for i, c in enumerate(clients * 8))
        )
        for i, (out, _, p) in enumerate(results):
            assert out == f"{i}\n".encode() and (await p.wait()).code == i
    finally:
        for c in clients:
            await c.close()


async def test_pending_calls_fail_cleanly_when_the_agent_dies(tmp_path: Path) -> None:
    a = HostAgent()
    c = await AgentClient.unix(a.path)
    p = await c.exec(ExecSpec(("sleep", "100")))
    os.kill(a.pid, signal.SIGKILL)
    a.proc.wait()
    with pytest.raises(EvmmError, match="the agent closed"):
        await p.wait()
    with pytest.raises(EvmmError):
        await c.exec(ExecSpec(("true",)))
    await wait_gone(p.pid)  # PR_SET_PDEATHSIG: it died with the agent
    await c.close()
    for path in a.dir.iterdir():
        path.unlink()
    a.dir.rmdir()
