"""``evmm clone SOCK --count N``: fork a running VM into N clones, each in a warm ``evmm serve`` of its own.

The servers start first (their Python start-up overlaps the snapshot), then the VM at SOCK is paused, saved
with a copy of each disk, and resumed; each clone gets its own copy-on-write view of the snapshot's memory
(MAP_PRIVATE of one file), its own copy of each disk (a reflink where the file system can, else a sparse
copy), a vsock CID of its own (BASE + i), and per NIC its own tap (``--tap`` pattern) and MAC; on restore
it gets a new VM generation ID, so its guest reseeds its RNG.  The clones keep running after this command
returns: ``evmm console DIR/clone-I/api.sock`` reaches one, ``evmm ctl ... quit`` ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from evmm.errors import EvmmError
from evmm.record import record

SERVER_START_TIMEOUT = 300.0  # seconds for a warm server's socket to appear (Python starts slowly nested)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "clone",
        help="fork a running VM into N clones (snapshot + restores in warm VMMs)",
        description="Pause the VM at SOCK, snapshot it with its disks, resume it, and restore the snapshot N "
        "times, each clone in an evmm serve of its own with its own disks, vsock CID, taps and MACs.",
    )
    p.add_argument("sock", type=Path, metavar="SOCK", help="the running VM's control socket")
    p.add_argument("--count", type=int, required=True, metavar="N", help="how many clones")
    p.add_argument("--dir", type=Path, metavar="DIR", help="where the snapshot and the clones' files go")
    p.add_argument(
        "--cid", type=int, metavar="BASE", help="clone I gets vsock CID BASE+I (default: the VM's + 1)"
    )
    p.add_argument(
        "--tap",
        metavar="PATTERN",
        help="clone I's tap for NIC J: PATTERN with {i} and {j} (default: TAP-c{i})",
    )
    p.add_argument("--keep-paused", action="store_true", help="leave the original VM paused")
    p.add_argument("--json", action="store_true", help="print the clones as JSON")
    p.add_argument("--allow-slow-kvm", action="store_true", help="passed to each evmm serve")
    p.set_defaults(func=run)


@record(frozen=True)
class ClonePlan:
    index: int
    directory: Path
    sock: Path
    cid: int | None
    vsock_path: Path | None
    taps: tuple[str, ...]
    macs: tuple[str, ...]
    drives: tuple[Path, ...]  # the clone's own copies
    sources: tuple[Path, ...]  # the snapshot's copies they are made from


def clone_mac(seed: str, index: int, nic: int) -> str:
    """A locally administered unicast MAC (52:54:00:...) of its own for NIC ``nic`` of clone ``index``."""
    tail = hashlib.sha256(f"{seed}/{index}/{nic}".encode()).digest()[:3]
    return ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00, *tail))


def tap_name(pattern: str | None, base: str | None, index: int, nic: int) -> str:
    name = pattern.format(i=index, j=nic) if pattern else f"{(base or 'evmm')[:9]}-c{index}"
    if not 0 < len(name) < 16:
        raise EvmmError(f"--tap: {name!r} is not a valid interface name (1 to 15 characters)")
    return name


def plan_clones(args: argparse.Namespace, snapshot: Path, directory: Path) -> list[ClonePlan]:
    from evmm.snapshot.restore import load_snapshot

    snap = load_snapshot(snapshot)
    config = snap.config
    ids = [drive.id or f"blk{j}" for j, drive in enumerate(config.drives)]
    base_cid = args.cid if args.cid is not None else (config.vsock.cid + 1 if config.vsock else None)
    plans = []
    for i in range(args.count):
        d = directory / f"clone-{i}"
        d.mkdir(parents=True, exist_ok=True)
        vsock = config.vsock
        plans.append(
            ClonePlan(
                index=i,
                directory=d,
                sock=d / "api.sock",
                cid=None if vsock is None or base_cid is None else base_cid + i,
                vsock_path=None if vsock is None or vsock.vhost else d / "v.sock",
                taps=tuple(tap_name(args.tap, n.tap, i, j) for j, n in enumerate(config.nets)),
                macs=tuple(clone_mac(str(snapshot), i, j) for j in range(len(config.nets))),
                drives=tuple(d / snap.disks[drive_id] for drive_id in ids),
                sources=tuple(snapshot / snap.disks[drive_id] for drive_id in ids),
            )
        )
    return plans


def start_server(path: Path, log: Path, slow_kvm: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "evmm", "serve", "--api-sock", str(path)]
    if slow_kvm:
        argv.append("--allow-slow-kvm")
    with open(log, "wb") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


async def wait_for(path: Path, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not path.exists():
        if server.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise EvmmError(f"evmm serve for {path} exited ({server.returncode}): {tail[0]}")
        if time.monotonic() > deadline:
            raise EvmmError(f"evmm serve for {path} did not start within {SERVER_START_TIMEOUT:g} s")
        await asyncio.sleep(0.02)


def restore_params(plan: ClonePlan, snapshot: Path) -> dict[str, Any]:
    params: dict[str, Any] = {"dir": str(snapshot)}
    if plan.drives:
        params["drive"] = ";".join(f"path={p}" for p in plan.drives)
    if plan.taps:
        params["net"] = ";".join(f"tap={t},mac={m}" for t, m in zip(plan.taps, plan.macs, strict=True))
    if plan.cid is not None:
        params["vsock"] = f"cid={plan.cid}," + (f"path={plan.vsock_path}" if plan.vsock_path else "vhost=on")
    return params


async def clone(args: argparse.Namespace, directory: Path) -> list[dict[str, Any]]:
    from evmm.control.client import Client
    from evmm.snapshot.disks import copy_image

    start = time.monotonic()
    servers: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i in range(args.count):
            d = directory / f"clone-{i}"
            d.mkdir(parents=True, exist_ok=True)
            logs.append(d / "console.log")
            servers.append(start_server(d / "api.sock", logs[-1], args.allow_slow_kvm))
        snapshot = directory / "snapshot"
        async with Client(args.sock) as vm:
            was = (await vm.call("query-status"))["state"]
            if was == "running":
                await vm.call("pause")
            try:
                saved = await vm.call("snapshot", {"dir": str(snapshot), "disks": "copy"})
            finally:
                if was == "running" and not args.keep_paused:
                    await vm.call("resume")
        paused_for = time.monotonic() - start
        plans = plan_clones(args, snapshot, directory)
        for plan in plans:
            for source, drive in zip(plan.sources, plan.drives, strict=True):
                copy_image(source, drive)
        await asyncio.gather(
            *(wait_for(p.sock, s, log) for p, s, log in zip(plans, servers, logs, strict=True))
        )

        async def restore(plan: ClonePlan) -> dict[str, Any]:
            async with Client(plan.sock) as c:
                answer = await c.call("restore", restore_params(plan, snapshot))
            return {
                "index": plan.index,
                "pid": servers[plan.index].pid,
                "api_sock": str(plan.sock),
                "cid": plan.cid,
                "vsock": None if plan.vsock_path is None else str(plan.vsock_path),
                "taps": list(plan.taps),
                "macs": list(plan.macs),
                "drives": [str(p) for p in plan.drives],
                "console_log": str(plan.directory / "console.log"),
                "restore_ms": answer["ms"],
            }

        clones = await asyncio.gather(*(restore(p) for p in plans))
        total = time.monotonic() - start
        for c in clones:
            c.update(
                total_ms=round(total * 1000, 1),
                snapshot_ms=saved["ms"],
                vm_paused_ms=round(paused_for * 1000, 1),
            )
        return list(clones)
    except BaseException:
        for s in servers:
            if s.poll() is None:
                s.kill()
                s.wait()
        raise


def run(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise EvmmError(f"--count {args.count}: give at least 1")
    directory = args.dir or Path(tempfile.mkdtemp(prefix="evmm-clone-", dir=os.environ.get("TMPDIR", "/tmp")))
    directory.mkdir(parents=True, exist_ok=True)
    clones = asyncio.run(clone(args, directory))
    if args.json:
        print(json.dumps({"dir": str(directory), "clones": clones}))
        return 0
    print(
        f"{len(clones)} clones of {args.sock} in {clones[0]['total_ms']:.0f} ms (snapshot in {directory / 'snapshot'})"
    )
    for c in clones:
        net = ", ".join(f"{t} {m}" for t, m in zip(c["taps"], c["macs"], strict=True)) or "no NIC"
        print(
            f"  clone {c['index']}: pid {c['pid']}, {c['api_sock']}, vsock CID {c['cid']}, {net}, "
            f"restored in {c['restore_ms']:.0f} ms"
        )
    return 0
