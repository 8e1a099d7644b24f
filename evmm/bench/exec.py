"""Row 7: running programs in the guest: evmm's agent (vsock) against qemu-guest-agent in QEMU microvm
(virtio-serial), each VMM with its own guest agent, on the same kernel and initramfs (the tools variant,
which carries qemu-ga; its /init starts qemu-ga when QEMU gave it the org.qemu.guest_agent.0 port).

- **first result**: the VMM launched → the output of ``echo`` back on the host: what a sandbox user waits
  for.  evmm: the agent answers through the hybrid vsock socket; QEMU: ``guest-sync`` answers, then
  ``guest-exec`` and ``guest-exec-status`` polled until it has exited.
- **true**: a ``true`` round trip, request → exit code (the median of ``CALLS``); QGA has no exit event,
  so its client polls ``guest-exec-status`` back to back, the fastest a QGA user can learn of the exit.
- **stdout**: ``head -c N /dev/zero`` with its output on the host: evmm streams it (credit windows),
  qemu-ga hands it over base64 in ``guest-exec-status`` once the process has exited (at most 16 MiB).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

from evmm.bench.console import VmProcess
from evmm.bench.context import Context, Measurement, Watch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side

MEMORY_MIB = 512  # the tools initramfs unpacks to ~120 MB
CALLS, QUICK_CALLS = 20, 5
STDOUT, QUICK_STDOUT = 8 << 20, 2 << 20  # under qemu-ga's 16 MiB capture limit
QGA_PORT = "org.qemu.guest_agent.0"
READY_TIMEOUT = 300.0
QGA_PATHS = {"true": "/bin/true", "head": "/usr/bin/head"}  # the commands _measure runs


class ExecBenchError(Exception):
    pass


def qemu_agent_args(sock: Path) -> list[str]:
    """QEMU's virtio-serial port for qemu-ga, as its documentation wires it (on virtio-mmio for microvm)."""
    return [
        *("-device", "virtio-serial-device"),
        *("-chardev", f"socket,path={sock},server=on,wait=off,id=qga0"),
        *("-device", f"virtserialport,chardev=qga0,name={QGA_PORT}"),
    ]


class Qga:
    """A minimal qemu-guest-agent client: one JSON command per line, one answer per line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, sock: Path, deadline: float) -> Qga:
        """Connect, then ``guest-sync`` until qemu-ga answers (the guest is booting until then)."""
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock), limit=64 << 20)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ExecBenchError(f"{sock}: QEMU's agent socket never appeared") from None
                await asyncio.sleep(0.02)
        qga = cls(reader, writer)
        for token in itertools.count(1):
            if time.monotonic() > deadline:
                raise ExecBenchError("qemu-ga never answered guest-sync")
            writer.write(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
            try:
                while True:  # skip the answers to earlier syncs that were still on their way
                    answer = json.loads(await asyncio.wait_for(reader.readline(), 0.5))
                    if answer.get("return") == token:
                        return qga
            except TimeoutError:
                continue
        raise AssertionError("unreachable")

    async def call(self, command: str, **arguments: Any) -> Any:
        self.writer.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        answer = json.loads(await self.reader.readline())
        if "error" in answer:
            raise ExecBenchError(f"qemu-ga {command}: {answer['error'].get('desc', answer['error'])}")
        return answer["return"]

    async def run(self, path: str, *args: str) -> tuple[int, bytes]:
        """guest-exec, then guest-exec-status back to back until the process has exited."""
        pid = (await self.call("guest-exec", path=path, arg=list(args), **{"capture-output": True}))["pid"]
        while not (status := await self.call("guest-exec-status", pid=pid))["exited"]:
            pass
        return int(status.get("exitcode", -1)), base64.b64decode(status.get("out-data", ""))

    def close(self) -> None:
        self.writer.close()


async def _evmm(vm: VmProcess, vsock: Path, calls: int, size: int) -> dict[str, float]:
    from evmm.sandbox import AgentClient, ExecSpec

    async def run(*argv: str) -> tuple[int | None, bytes]:
        p = await agent.exec(ExecSpec(argv))
        out = await p.stdout.read()
        return (await p.wait()).code, out

    agent = await AgentClient.connect_when_ready(vsock, timeout=READY_TIMEOUT)
    try:
        code, out = await run("echo", "hi")
        first = time.monotonic() - vm.launched
        if (code, out) != (0, b"hi\n"):
            raise ExecBenchError(f"evmm-agent: echo hi gave {code}, {out!r}")
        return {"first": first, **await _measure(run, calls, size)}
    finally:
        await agent.close()


async def _qemu(vm: VmProcess, sock: Path, calls: int, size: int) -> dict[str, float]:
    qga = await Qga.connect(sock, time.monotonic() + READY_TIMEOUT)
    try:
        code, out = await qga.run("/bin/echo", "hi")
        first = time.monotonic() - vm.launched
        if (code, out) != (0, b"hi\n"):
            raise ExecBenchError(f"qemu-ga: echo hi gave {code}, {out!r}")

        async def run(*argv: str) -> tuple[int | None, bytes]:
            # guest-exec takes a path; the tools initramfs has busybox's applets in /bin and /usr/bin.
            return await qga.run(QGA_PATHS[argv[0]], *argv[1:])

        return {"first": first, **await _measure(run, calls, size)}
    finally:
        qga.close()


async def _measure(run: Any, calls: int, size: int) -> dict[str, float]:
    """The same work on both sides: ``calls`` true round trips, then ``size`` bytes of stdout."""
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        code, _ = await run("true")
        times.append(time.perf_counter() - t)
        if code != 0:
            raise ExecBenchError(f"true exited {code}")
    t = time.perf_counter()
    code, out = await run("head", "-c", str(size), "/dev/zero")
    seconds = time.perf_counter() - t
    if code != 0 or len(out) != size:
        raise ExecBenchError(f"head -c {size} gave {code} and {len(out)} bytes")
    return {"true": statistics.median(times), "stdout": size / seconds}


class ExecRow:
    name = "exec"
    sides = (EVMM, QEMU)

    def metrics(self) -> list[MetricSpec]:
        agents = "evmm-agent (vsock) vs qemu-ga (virtio-serial)"
        return [
            MetricSpec("exec.first", "exec", f"launch → first command's output ({agents})", "ms", "lower"),
            MetricSpec("exec.true", "exec", f"true: request → exit code ({agents})", "ms", "lower"),
            MetricSpec("exec.stdout", "exec", f"stdout to the host ({agents})", "MB/s", "higher"),
        ]

    def setup(self, ctx: Context) -> None:
        if not ctx.guest.tools_initramfs.is_file():
            raise ExecBenchError("no tools initramfs (qemu-ga): run `evmm assets`")

    def teardown(self, ctx: Context) -> None:
        pass

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        calls = QUICK_CALLS if ctx.quick else CALLS
        size = QUICK_STDOUT if ctx.quick else STDOUT
        spec = ctx.spec(MEMORY_MIB, tools=True)
        sock = ctx.workdir / f"{side.name}-agent.sock"
        sock.unlink(missing_ok=True)
        extra = ["--vsock", f"cid=3,path={sock}"] if side.vmm == "evmm" else qemu_agent_args(sock)
        vm = VmProcess([*side.argv(spec), *extra], f"{side.name}-exec")
        if watch is not None:
            watch(vm)
        with vm:
            if side.vmm == "evmm":
                got = asyncio.run(_evmm(vm, sock, calls, size))
            else:
                got = asyncio.run(_qemu(vm, sock, calls, size))
        for p in sock.parent.glob(f"{sock.name}*"):
            p.unlink(missing_ok=True)
        out = Measurement()
        out.values["exec.first"] = got["first"] * 1000
        out.values["exec.true"] = got["true"] * 1000
        out.values["exec.stdout"] = got["stdout"] / 1e6
        out.work["exec.stdout"] = size
        return out
