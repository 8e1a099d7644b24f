#!/usr/bin/env python3
"""Where an idle evmm's memory goes, mapping by mapping (not a test): python scripts/bench_memory.py

Starts ``python -m evmm run`` with a 128 MiB guest (natively with --allow-slow-kvm where /dev/kvm is PVM,
or in the KVM test host), waits until vCPU 0 has run for ``--settle`` seconds, reads /proc/PID/smaps and
prints the resident memory of each kind of mapping, the guest RAM apart (``evmm bench``'s memory row counts
the rest as the VMM's overhead, evmm/bench/smaps.py).  ``--runs`` launches, medians.  With ``--python`` it
also measures bare interpreters for the floor: ``python -S``, ``python`` (this installation's site), and
``python -c 'import uvloop'`` (asyncio, its ssl, uvloop).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evmm.assets import default_guest
from evmm.bench.smaps import Mapping, guest_mappings, parse
from evmm.hostkvm import probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_startup import stop

MiB = 1 << 20
GUEST = 128 * MiB
OPENSSL = ("libcrypto", "libssl", "_ssl.")
CFFI = ("_cffi_backend", "_kvm_ffi", "_serial_ffi", "_vhost_ffi", "_uring_ffi", "libffi")


def kind(m: Mapping, before: Mapping | None) -> str:
    """What a mapping is, for the table."""
    name = os.path.basename(m.path)
    if m.path.startswith("anon_inode:kvm"):
        return "KVM (kvm_run pages)"
    if "libpython" in name:
        return "libpython (code and static data)"
    if any(k in name for k in OPENSSL):
        return "OpenSSL (absent unless something imports ssl or hashlib again: evmm/loop/nossl.py)"
    if any(k in name for k in CFFI):
        return "cffi: backend and evmm's compiled modules"
    if "uvloop" in m.path or name.startswith("loop.cpython"):
        return "uvloop"
    if ".cpython-" in name:
        return "other extension modules (stdlib, msgpack)"
    if ".so" in name:
        return "libc, libm, ld.so, other libraries"
    if m.path == "[heap]":
        return "malloc heap ([heap]: objects > 512 bytes, buffers)"
    if m.path == "[stack]":
        return "main thread's stack"
    if m.path:
        return "other files (locale, ...)"
    if (
        before is not None
        and before.end == m.start
        and before.perms.startswith("---")
        and before.size <= 64 << 10
    ):
        return "thread stacks (behind their guard pages)"
    return "anonymous: Python object arenas, thread heaps, buffers"


def breakdown(pid: int) -> dict[str, float]:
    maps = parse(Path(f"/proc/{pid}/smaps").read_text())
    guest = guest_mappings(maps, [GUEST])
    out: Counter[str] = Counter()
    before: Mapping | None = None
    for m in maps:
        if m not in guest:
            out[kind(m, before)] += m.rss
        before = m
    total = sum(out.values())
    res = {k: v / MiB for k, v in out.items()}
    res["total overhead (everything but guest RAM)"] = total / MiB
    res["guest RAM touched (not overhead)"] = sum(m.rss for m in guest) / MiB
    return res


def launch(argv: list[str], settle: float) -> dict[str, float]:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    try:
        for raw in p.stderr:
            if b"start-up:" in raw:
                break
        time.sleep(settle)
        return breakdown(p.pid)
    finally:
        stop(p)


def interpreter(argv: list[str]) -> float:
    code = "import re, sys; t = open('/proc/self/smaps_rollup').read(); print(re.search(r'Rss:\\s+(\\d+)', t)[1])"
    out = subprocess.run([*argv, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after vCPU 0 starts (default 10)")
    ap.add_argument("--python", action="store_true", help="also the bare interpreter's floor")
    args = ap.parse_args()
    guest = default_guest()
    kernel = guest.vmlinux if guest.vmlinux.exists() else guest.bzimage
    argv = [
        sys.executable,
        "-m",
        "evmm",
        "run",
        "-v",
        "--kernel",
        str(kernel),
        "--initrd",
        str(guest.initramfs),
    ]
    argv += ["--memory", f"{GUEST // MiB}M", "--append", "console=ttyS0 quiet"]
    if not probe().can_boot_linux:
        argv.append("--allow-slow-kvm")
    runs = [launch(argv, args.settle) for _ in range(args.runs)]
    keys = sorted({k for r in runs for k in r}, key=lambda k: -statistics.median(r.get(k, 0) for r in runs))
    print(
        f"evmm run, {GUEST // MiB} MiB guest, {args.settle:g} s after vCPU 0 started, {args.runs} runs (MiB):"
    )
    print("| mapping | resident MiB (median) |\n| --- | ---: |")
    for k in keys:
        print(f"| {k} | {statistics.median(r.get(k, 0.0) for r in runs):.2f} |")
    if args.python:
        py = sys.executable
        print("\nbare interpreters (RSS MiB):")
        for label, cmd in (
            ("python -S (no site)", [py, "-S"]),
            ("python (this installation's site and .pth files)", [py]),
        ):
            print(f"| {label} | {interpreter(cmd):.2f} |")
        rss = (
            "import re; t = open('/proc/self/smaps_rollup').read(); print(re.search(r'Rss:\\s+(\\d+)', t)[1])"
        )
        for label, setup in (
            ("python + uvloop (asyncio, ssl)", ""),
            (
                "python + uvloop without OpenSSL (evmm's)",
                "from evmm.loop.nossl import import_without_ssl; import_without_ssl(); ",
            ),
        ):
            code = f"{setup}import uvloop; uvloop.new_event_loop(); {rss}"
            out = subprocess.run(
                [py, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
            ).stdout
            print(f"| {label} | {int(out) / 1024:.2f} |")
    print(f"(load {os.getloadavg()[0]:.1f}; {re.sub(r'[^0-9.]', '', sys.version.split()[0])} Python)")


if __name__ == "__main__":
    main()
