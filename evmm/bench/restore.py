"""Row 8: snapshot and restore: the snapshot's size, restore -> guest answering (cold and warm), ten at once.

Per run, each side boots the default guest (128 MiB, serial console only) to its prompt, times it answering
(cold boot), saves it and quits, then restores it three ways and times each until the guest answers a
command on its console (``echo`` through the serial line, the first thing a user or an agent would see):

* cold: a new process (evmm: ``evmm run --restore DIR``; QEMU: the same command line with ``-incoming
  exec:cat FILE``), from launch;
* warm: a VMM already started and waiting (evmm: ``evmm serve``, then its ``restore`` method; QEMU: ``-incoming
  defer``, then QMP ``migrate-incoming``), from the request;
* ten warm ones at once, from the requests to the last one answering.

evmm saves with ``snapshot`` on a paused VM (the memory file is sparse: its size is what is on disk); QEMU
with QMP ``migrate`` to ``exec:cat > FILE``, its own save to a file, and restores everything before running
(no MAP_PRIVATE: every page is read at once).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from evmm.bench.console import PROMPT, READY, VmProcess
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side, VmSpec, qemu_argv

MEMORY_MIB = 128
CLONES = 10
QUICK_CLONES = 3
ANSWER_TIMEOUT = 120.0
SERVE_TIMEOUT = 120.0


Request = Callable[[Path], Awaitable[object]]


class RestoreError(Exception):
    pass


def ask(vm: VmProcess) -> str:
    """Type a command on the console whose output is a fresh token; the token (``answer`` waits for it)."""
    token = uuid.uuid4().hex[:10]
    # The leading newline: typed while QEMU is still loading an incoming state, one byte goes into the
    # UART's receive buffer and the loaded UART state replaces it (seen as "cho: not found"); the byte lost
    # is then the newline, and the command arrives whole.
    vm.sendline(f"\necho @@''{token}")  # the quotes keep the echoed line from matching
    return f"@@{token}"


def answer(vm: VmProcess, token: str, timeout: float = ANSWER_TIMEOUT) -> float:
    """The moment the guest's answer arrived (the console's reader thread notes each chunk's arrival, so
    waiting for several guests one after another still gives each one's own time)."""
    _, at = vm.wait_for(token, timeout)
    return at


def answered(vm: VmProcess) -> float:
    return answer(vm, ask(vm))


def on_disk(path: Path) -> float:
    """MiB the snapshot takes on disk (allocated blocks: a sparse file's holes cost nothing)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files) / (1 << 20)


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:  # not there yet, or bound but not yet listening
            return False
    return True


async def _until_socket(path: Path, vm: VmProcess) -> None:
    """Wait until the VMM accepts connections on ``path`` (its existence is not enough: a bound socket refuses
    connections until listen(2))."""
    deadline = time.monotonic() + SERVE_TIMEOUT
    while not _listening(path):
        if not vm.alive():
            raise RestoreError(f"{vm.name} exited before its socket appeared\n{vm.tail()}")
        if time.monotonic() > deadline:
            raise RestoreError(f"{vm.name}: no {path} within {SERVE_TIMEOUT:g} s")
        await asyncio.sleep(0.01)


# ---- evmm ----------------------------------------------------------------------------------------------------


async def _evmm_call(sock: Path, method: str, **params: object) -> object:
    from evmm.control import Client

    async with Client(sock) as c:
        return await c.call(method, params)


def _serve(ctx: Context, name: str, watch: Watch | None) -> tuple[VmProcess, Path]:
    sock = ctx.workdir / f"{name}.sock"
    sock.unlink(missing_ok=True)  # an earlier run's VMM, killed, left it; waiting must see this run's
    vm = VmProcess([sys.executable, "-m", "evmm", "serve", "--api-sock", str(sock)], name)
    if watch is not None:
        watch(vm)
    return vm, sock


async def _at_once(started: list[tuple[VmProcess, Path]], request: Request) -> float:
    """Seconds from asking every waiting VMM to restore (``request(its socket)``) to the last guest answering;
    the VMMs are killed afterwards."""
    try:
        await asyncio.gather(*(_until_socket(sock, vm) for vm, sock in started))
        start = time.monotonic()
        await asyncio.gather(*(request(sock) for _, sock in started))
        tokens = [ask(vm) for vm, _ in started]
        return max(answer(vm, token) for (vm, _), token in zip(started, tokens, strict=True)) - start
    finally:
        for vm, _ in started:
            vm.kill()


def _warm(ctx: Context, snap: Path, names: list[str], watch: Watch | None) -> float:
    servers = [_serve(ctx, name, watch) for name in names]
    return asyncio.run(_at_once(servers, lambda sock: _evmm_call(sock, "restore", dir=str(snap))))


def _measure_evmm(ctx: Context, spec: VmSpec, watch: Watch | None, clones: int) -> Measurement:
    out = Measurement()
    snap = ctx.workdir / "evmm-snapshot"
    shutil.rmtree(snap, ignore_errors=True)
    sock = ctx.workdir / "evmm-restore.sock"
    with launch(EVMM, replace(spec, api_sock=sock), "evmm-restore-boot", watch) as vm:
        vm.wait_for(READY, ctx.boot_timeout)
        vm.wait_for(PROMPT, 60)
        out.values["restore.boot"] = (answered(vm) - vm.launched) * 1000
        asyncio.run(_evmm_call(sock, "pause"))
        t = time.monotonic()
        asyncio.run(_evmm_call(sock, "snapshot", dir=str(snap)))
        out.values["restore.save"] = (time.monotonic() - t) * 1000
        asyncio.run(_evmm_call(sock, "quit"))
        vm.wait_exit(60)
    out.values["restore.size"] = on_disk(snap)
    cold = VmProcess([sys.executable, "-m", "evmm", "run", "--restore", str(snap)], "evmm-restore-cold")
    if watch is not None:
        watch(cold)
    with cold:
        out.values["restore.cold"] = (answered(cold) - cold.launched) * 1000
    out.values["restore.warm"] = _warm(ctx, snap, ["evmm-warm"], watch) * 1000
    names = [f"evmm-clone{i}" for i in range(clones)]
    out.values["restore.clones"] = _warm(ctx, snap, names, watch) * 1000
    shutil.rmtree(snap, ignore_errors=True)
    return out


# ---- QEMU ----------------------------------------------------------------------------------------------------


async def _qmp(path: Path, command: str, **args: object) -> object:
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench-restore")
    await qmp.connect(str(path))
    try:
        return await qmp.execute(command, args or None)
    finally:
        try:
            await qmp.disconnect()
        except EOFError:
            if command != "quit":  # QEMU closing the socket is quit's answer
                raise


async def _qemu_save(qmp_sock: Path, image: Path) -> None:
    """QMP ``migrate`` to a file and wait for it to complete (the guest ends paused, postmigrate)."""
    await _qmp(qmp_sock, "migrate", uri=f"exec:cat > {image}")
    deadline = time.monotonic() + 300
    while True:
        state = await _qmp(qmp_sock, "query-migrate")
        status = state.get("status") if isinstance(state, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RestoreError(f"QEMU's migrate to {image} ended {status}: {state}")
        await asyncio.sleep(0.02)


def _qemu(spec: VmSpec, name: str, watch: Watch | None, *extra: str) -> VmProcess:
    vm = VmProcess([*qemu_argv(spec), *extra], name)
    if watch is not None:
        watch(vm)
    return vm


def _qemu_warm(ctx: Context, spec: VmSpec, image: Path, count: int, watch: Watch | None) -> float:
    waiting = []
    for i in range(count):
        sock = ctx.workdir / f"qemu-warm{i}.sock"
        sock.unlink(missing_ok=True)
        waiting.append(
            (_qemu(replace(spec, qmp_sock=sock), f"qemu-warm{i}", watch, "-incoming", "defer"), sock)
        )
    return asyncio.run(
        _at_once(waiting, lambda sock: _qmp(sock, "migrate-incoming", uri=f"exec:cat {image}"))
    )


def _measure_qemu(ctx: Context, spec: VmSpec, watch: Watch | None, clones: int) -> Measurement:
    out = Measurement()
    image = ctx.workdir / "qemu-state.bin"
    image.unlink(missing_ok=True)
    qmp_sock = ctx.workdir / "qemu-restore.sock"
    with launch(QEMU, replace(spec, qmp_sock=qmp_sock), "qemu-restore-boot", watch) as vm:
        vm.wait_for(READY, ctx.boot_timeout)
        vm.wait_for(PROMPT, 60)
        out.values["restore.boot"] = (answered(vm) - vm.launched) * 1000
        t = time.monotonic()
        asyncio.run(_qemu_save(qmp_sock, image))
        out.values["restore.save"] = (time.monotonic() - t) * 1000
        asyncio.run(_qmp(qmp_sock, "quit"))
        vm.wait_exit(60)
    out.values["restore.size"] = on_disk(image)
    with _qemu(spec, "qemu-restore-cold", watch, "-incoming", f"exec:cat {image}") as cold:
        out.values["restore.cold"] = (answered(cold) - cold.launched) * 1000
    out.values["restore.warm"] = _qemu_warm(ctx, spec, image, 1, watch) * 1000
    out.values["restore.clones"] = _qemu_warm(ctx, spec, image, clones, watch) * 1000
    image.unlink(missing_ok=True)
    return out


class RestoreRow:
    name = "restore"
    sides = (EVMM, QEMU)

    def __init__(self) -> None:
        self.clones = CLONES

    def metrics(self) -> list[MetricSpec]:
        return [
            MetricSpec(
                "restore.size", "restore", "snapshot on disk (a 128 MiB guest at its prompt)", "MiB", "lower"
            ),
            MetricSpec(
                "restore.save",
                "restore",
                "save it (evmm: snapshot of the paused VM; QEMU: migrate to exec:cat > FILE)",
                "ms",
                "lower",
            ),
            MetricSpec("restore.boot", "restore", "cold boot: launch → guest answering", "ms", "lower"),
            MetricSpec(
                "restore.cold",
                "restore",
                "cold restore: launch → answering (evmm run --restore; qemu -incoming)",
                "ms",
                "lower",
            ),
            MetricSpec(
                "restore.warm",
                "restore",
                "warm restore: request → answering (evmm serve; qemu -incoming defer)",
                "ms",
                "lower",
            ),
            MetricSpec(
                "restore.clones",
                "restore",
                f"{CLONES} warm restores at once ({QUICK_CLONES} with --quick) → all answering",
                "ms",
                "lower",
            ),
        ]

    def setup(self, ctx: Context) -> None:
        if ctx.quick:
            self.clones = QUICK_CLONES
        os.makedirs(ctx.workdir, exist_ok=True)

    def teardown(self, ctx: Context) -> None:
        pass

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        spec = ctx.spec(MEMORY_MIB)
        if side.vmm == "evmm":
            return _measure_evmm(ctx, spec, watch, self.clones)
        return _measure_qemu(ctx, spec, watch, self.clones)
