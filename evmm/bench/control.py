"""Row 5: control latency: pause -> paused, resume -> running, and a ``query-status`` round trip.

Each VMM through its native channel (evmm: the msgpack control socket with ``evmm.control.Client``; QEMU: QMP
with ``qemu.qmp``), and both through QMP with the same client library, which compares the servers alone.  A
call's latency is from sending the request to having its answer: evmm answers ``pause`` once every vCPU is
parked and ``resume`` once they run; QEMU's ``stop`` returns after its vCPUs have paused, ``cont`` after
they were set running.  A run is one boot; its value is the median of ``CALLS`` calls (an idle guest).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side

MEMORY_MIB = 128
CALLS = 20
QUICK_CALLS = 5

Call = Callable[[str], Awaitable[Any]]


class ControlError(Exception):
    pass


async def _time(call: Call, method: str) -> float:
    t = time.perf_counter()
    await call(method)
    return time.perf_counter() - t


async def _cycles(call: Call, names: tuple[str, str, str], n: int) -> dict[str, float]:
    """Median seconds of ``n`` pause, resume and status calls (pause and resume alternate)."""
    pause, resume, status = names
    got: dict[str, list[float]] = {"pause": [], "resume": [], "status": []}
    for _ in range(n):
        got["status"].append(await _time(call, status))
        got["pause"].append(await _time(call, pause))
        got["resume"].append(await _time(call, resume))
    return {k: statistics.median(v) for k, v in got.items()}


async def _native_evmm(path: str, n: int) -> dict[str, float]:
    from evmm.control import Client

    async with Client(path) as c:
        state = (await c.call("query-status"))["state"]
        if state != "running":
            raise ControlError(f"evmm reports {state!r}, not running")
        return await _cycles(c.call, ("pause", "resume", "query-status"), n)


async def _qmp(path: str, n: int) -> dict[str, float]:
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench")
    await qmp.connect(path)
    try:
        status = await qmp.execute("query-status")
        if not isinstance(status, dict) or status.get("status") != "running":
            raise ControlError(f"QMP reports {status!r}, not running")

        async def call(method: str) -> Any:
            return await qmp.execute(method)

        return await _cycles(call, ("stop", "cont", "query-status"), n)
    finally:
        await qmp.disconnect()


class ControlRow:
    name = "control"
    sides = (EVMM, QEMU)

    def metrics(self) -> list[MetricSpec]:
        native = "evmm msgpack vs QEMU QMP"
        return [
            MetricSpec("control.pause", "control", f"pause → paused ({native})", "ms", "lower"),
            MetricSpec("control.resume", "control", f"resume → running ({native})", "ms", "lower"),
            MetricSpec("control.status", "control", f"query-status round trip ({native})", "µs", "lower"),
            MetricSpec("control.qmp.pause", "control", "pause → paused (QMP, both)", "ms", "lower"),
            MetricSpec("control.qmp.resume", "control", "resume → running (QMP, both)", "ms", "lower"),
            MetricSpec("control.qmp.status", "control", "query-status round trip (QMP, both)", "µs", "lower"),
        ]

    def setup(self, ctx: Context) -> None:
        pass

    def teardown(self, ctx: Context) -> None:
        pass

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        n = QUICK_CALLS if ctx.quick else CALLS
        qmp_sock = ctx.workdir / f"{side.name}-qmp.sock"
        api_sock = ctx.workdir / f"{side.name}-api.sock" if side.vmm == "evmm" else None
        spec = replace(ctx.spec(MEMORY_MIB), qmp_sock=qmp_sock, api_sock=api_sock)
        out = Measurement()
        with launch(side, spec, f"{side.name}-control", watch) as vm:
            vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)
            qmp = asyncio.run(_qmp(str(qmp_sock), n))
            native = asyncio.run(_native_evmm(str(api_sock), n)) if api_sock is not None else qmp
            scale = {"pause": 1e3, "resume": 1e3, "status": 1e6}
            for what, k in scale.items():
                out.values[f"control.{what}"] = native[what] * k
                out.values[f"control.qmp.{what}"] = qmp[what] * k
            vm.sendline("poweroff")
            vm.wait_exit(120)
        for p in (qmp_sock, api_sock):
            if p is not None:
                p.unlink(missing_ok=True)
        return out
