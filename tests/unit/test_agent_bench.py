"""The exec benchmark row's qemu-guest-agent client (evmm/bench/exec.py) against a fake qemu-ga: it waits for
``guest-sync`` past the answers to earlier syncs, polls ``guest-exec-status`` until the process has exited,
decodes its output, and reports qemu-ga's errors."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from evmm.bench.exec import ExecBenchError, Qga, qemu_agent_args


class FakeQga:
    """Answers like qemu-ga; ``deaf`` syncs are dropped (the guest still booting), ``polls`` status calls say
    the process still runs."""

    def __init__(self, deaf: int = 2, polls: int = 3) -> None:
        self.deaf = deaf
        self.polls = polls
        self.seen: list[dict[str, Any]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            cmd = json.loads(line)
            self.seen.append(cmd)
            name, args = cmd["execute"], cmd.get("arguments", {})
            if name == "guest-sync":
                if self.deaf:
                    self.deaf -= 1
                    continue
                answer: Any = {"return": args["id"]}
            elif name == "guest-exec":
                answer = (
                    {"return": {"pid": 42}}
                    if args["path"] != "/bin/nope"
                    else {"error": {"desc": "no such file"}}
                )
            else:
                self.polls -= 1
                done = {"exited": True, "exitcode": 0, "out-data": base64.b64encode(b"hi\n").decode()}
                answer = {"return": {"exited": False} if self.polls > 0 else done}
            writer.write(json.dumps(answer).encode() + b"\n")
        writer.close()


@pytest.fixture
async def qga() -> AsyncIterator[tuple[FakeQga, Path]]:
    with tempfile.TemporaryDirectory(prefix="evmm-qga-", dir="/tmp") as d:
        fake = FakeQga()
        path = Path(d) / "qga.sock"
        server = await asyncio.start_unix_server(fake.serve, str(path))
        yield fake, path
        server.close()


async def test_sync_waits_for_its_own_answer_then_exec_polls_to_the_exit(qga: tuple[FakeQga, Path]) -> None:
    fake, path = qga
    client = await Qga.connect(path, time.monotonic() + 30)
    syncs = [c for c in fake.seen if c["execute"] == "guest-sync"]
    assert len(syncs) == 3  # two went unanswered while "booting"
    assert await client.run("/bin/echo", "hi") == (0, b"hi\n")
    statuses = [c for c in fake.seen if c["execute"] == "guest-exec-status"]
    assert len(statuses) == 3 and all(c["arguments"] == {"pid": 42} for c in statuses)
    exec_call = next(c for c in fake.seen if c["execute"] == "guest-exec")
    assert exec_call["arguments"] == {"path": "/bin/echo", "arg": ["hi"], "capture-output": True}
    with pytest.raises(ExecBenchError, match="qemu-ga guest-exec: no such file"):
        await client.run("/bin/nope")
    client.close()


async def test_a_socket_that_never_appears_is_an_error() -> None:
    with pytest.raises(ExecBenchError, match="never appeared"):
        await Qga.connect(Path("/nonexistent/qga.sock"), time.monotonic() + 0.2)


def test_qemu_gets_the_port_qemu_ga_looks_for() -> None:
    args = qemu_agent_args(Path("/tmp/q.sock"))
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in args
    assert "socket,path=/tmp/q.sock,server=on,wait=off,id=qga0" in args
