#!/usr/bin/env python3
"""Where ``evmm run`` spends its start-up, step by step (not a test): python scripts/bench_startup.py

Starts ``python -m evmm run -v`` many times, reads the ``start-up:`` line evmm logs when vCPU 0 first enters
KVM_RUN (evmm/startup.py), stops it, and prints the median and minimum of every step in milliseconds: exec ->
main (the interpreter, its site, evmm.cli.main's imports) from the clock read here before the launch, each lap
evmm reports, and exec -> first KVM_RUN.  With several ``--tree`` (evmm checkouts, e.g. one at the commit
before a change) the runs alternate between them, A B A B, so load on a shared machine hits both alike.

``--importtime`` runs each launch under ``python -X importtime`` too and splits the import time by whose module
ran (evmm's own, the standard library, uvloop/cffi/msgpack, the interpreter's site), by self time.
``--cold`` measures with evmm's bytecode missing (its modules compiled from source at every launch, as on a
tree where none could be written), the standard library's still cached.  Runs natively where /dev/kvm is
PVM (``--allow-slow-kvm``: the guest never gets far, but start-up is all this measures) and in the KVM test
host:  python -m evmm testhost run -- python scripts/bench_startup.py --runs 10
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evmm.assets import default_guest
from evmm.hostkvm import probe

LINE = re.compile(r"start-up: main at ([\d.]+); (.*); first KVM_RUN at ([\d.]+)")
LAP = re.compile(r"([\w ]+?) ([\d.]+) ms")
IMPORT = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s+)(\S+)")  # self us, cumulative us, name
THIRD_PARTY = ("uvloop", "cffi", "_cffi_backend", "msgpack")
TIMEOUT = 600.0


def owner(module: str) -> str:
    top = module.split(".")[0]
    if top == "evmm":
        return "evmm"
    if top in THIRD_PARTY:
        return "uvloop, cffi, msgpack"
    return "stdlib"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as a user's Ctrl-C would end evmm; SIGKILL after 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def launch(tree: Path, argv: list[str], env: dict[str, str], importtime: bool) -> dict[str, float]:
    """One start-up of the evmm in ``tree``: every step's milliseconds."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "evmm", "run", "-v", *argv]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    steps: dict[str, float] = {}
    imports: dict[str, float] = defaultdict(float)
    deadline = time.monotonic() + TIMEOUT
    try:
        for raw in proc.stderr:
            text = raw.decode(errors="replace")
            m = IMPORT.match(text)
            if m:
                name = m.group(4)
                imports[owner(name)] += int(m.group(1)) / 1000
                if name == "site":
                    imports["site (.pth files and what they import)"] = int(m.group(2)) / 1000
                continue
            m = LINE.search(text)
            if m:
                main_at, first = float(m.group(1)), float(m.group(3))
                steps["exec -> main"] = (main_at - t0) * 1000
                for lap in m.group(2).split(", "):
                    lm = LAP.fullmatch(lap.strip())
                    if lm:
                        steps[lm.group(1)] = float(lm.group(2))
                steps["exec -> first KVM_RUN"] = (first - t0) * 1000
                break
            if time.monotonic() > deadline:
                break
    finally:
        stop(proc)
    if not steps:
        raise SystemExit(f"{tree}: evmm printed no start-up line (exit {proc.returncode}): {' '.join(cmd)}")
    if importtime:
        site = imports.pop("site (.pth files and what they import)", 0.0)
        for who, ms in imports.items():
            steps[f"imports, self time: {who}"] = ms
        steps["imports: site (cumulative)"] = site
    return steps


def cold_cache(trees: list[Path]) -> Path:
    """A bytecode cache holding everything but evmm's own modules (PYTHONPYCACHEPREFIX)."""
    prefix = Path(tempfile.mkdtemp(prefix="evmm-pycache-"))
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for tree in trees:  # one launch writes the cache of every module a launch imports
        subprocess.run(
            [sys.executable, "-c", "import evmm.cli.run_cmd, uvloop, cffi"], cwd=tree, env=env, check=True
        )
        shutil.rmtree(prefix / str(tree.resolve()).lstrip("/"), ignore_errors=True)
    return prefix


def table(results: dict[Path, list[dict[str, float]]]) -> str:
    trees = list(results)
    keys: list[str] = []
    for runs in results.values():
        for r in runs:
            keys += [k for k in r if k not in keys]
    head = "| step (ms) | " + " | ".join(f"{t.name}: median [min]" for t in trees) + " |"
    lines = [head, "| --- |" + " ---: |" * len(trees)]
    for k in keys:
        cells = []
        for t in trees:
            vals = [r[k] for r in results[t] if k in r]
            cells.append(f"{statistics.median(vals):.1f} [{min(vals):.1f}]" if vals else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="launches per tree (default 10)")
    p.add_argument(
        "--tree", type=Path, action="append", help="an evmm checkout (repeatable; default this one)"
    )
    p.add_argument("--memory", default="128M")
    p.add_argument("--importtime", action="store_true", help="also split the imports (python -X importtime)")
    p.add_argument("--cold", action="store_true", help="without evmm's bytecode")
    args = p.parse_args()
    trees = args.tree or [Path(__file__).resolve().parent.parent]
    guest = default_guest()
    kernel = guest.vmlinux if guest.vmlinux.exists() else guest.bzimage
    argv = ["--kernel", str(kernel), "--initrd", str(guest.initramfs), "--memory", args.memory]
    argv += ["--append", "console=ttyS0 quiet"]
    if not probe().can_boot_linux:
        argv.append("--allow-slow-kvm")
    env = dict(os.environ)
    prefix = None
    if args.cold:
        prefix = cold_cache(trees)
        env.update(PYTHONPYCACHEPREFIX=str(prefix), PYTHONDONTWRITEBYTECODE="1")
    results: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    try:
        for i in range(args.runs):
            for t in trees:
                results[t].append(launch(t, argv, env, args.importtime))
            print(f"run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
    finally:
        if prefix is not None:
            shutil.rmtree(prefix, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"{args.runs} launches per tree, {'cold' if args.cold else 'warm'} evmm bytecode, load {load:.1f}")
    print(table(results))


if __name__ == "__main__":
    main()
