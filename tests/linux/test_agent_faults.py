"""Faults around the guest agent, in a real guest: the agent killed inside the guest while a call waits, then
the VMM killed while a call waits.  Each pending call ends with one clear error, nothing is left running
(the agent's children die with it: PR_SET_PDEATHSIG), and busybox init respawns the agent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from evmm.errors import EvmmError
from evmm.sandbox import AgentClient, ExecSpec, Process, Sandbox
from tests.linux.test_agent import linux_sandbox

pytestmark = pytest.mark.asyncio


async def _reconnect(box: Sandbox, timeout: float = 60.0) -> AgentClient:
    """The respawned agent, through the same vsock socket."""
    assert box._vmm is not None
    return await AgentClient.connect_when_ready(box._vmm.vsock, timeout=timeout)


async def test_the_agent_killed_then_the_vmm_killed(request: pytest.FixtureRequest) -> None:
    async with linux_sandbox(request.node, "agent-faults") as box:
        waiting = await box.exec(["sleep", "1000"])
        old_agent = (await box.agent.version())["pid"]

        # The agent is the parent of what it runs: kill it from a process of its own.
        await box.exec(["sh", "-c", "kill -KILL $PPID"])
        started = time.monotonic()
        with pytest.raises(EvmmError, match=r"^process \d+: .*agent"):
            await asyncio.wait_for(waiting.wait(), 60)
        assert time.monotonic() - started < 30
        with pytest.raises(EvmmError):
            await box.run(["true"])

        agent = await _reconnect(box)
        assert (await agent.version())["pid"] != old_agent  # init respawned it
        listing = await _run(agent, "ps -o pid,args")
        assert b"sleep 1000" not in listing, listing

        # Now the VMM: a call waiting in the guest ends at once, with one line.
        waiting = await _exec(agent, ["sleep", "1000"])
        assert box._vmm is not None
        os.kill(box._vmm.proc.pid, signal.SIGKILL)
        with pytest.raises(EvmmError, match="agent"):
            await asyncio.wait_for(waiting.wait(), 30)
        with pytest.raises(EvmmError):
            await _run(agent, "true")
        await agent.close()


async def _exec(agent: AgentClient, argv: list[str]) -> Process:
    return await agent.exec(ExecSpec(tuple(argv)))


async def _run(agent: AgentClient, script: str) -> bytes:
    p = await _exec(agent, ["sh", "-c", script])
    out = await p.stdout.read()
    await p.wait()
    return bytes(out)
