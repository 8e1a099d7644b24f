"""``evmm bench``: evmm against QEMU microvm on the same KVM, one command (docs/performance.md).

Where this host's KVM boots Linux the benchmark runs here.  Otherwise it runs itself inside the KVM test host,
in one test-host boot (``evmm testhost run --share OUT -- python -m evmm bench --inside ...``), and draws the
table, the Markdown and the chart here from the ``results.json`` the inner run left in OUT.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from evmm.errors import ConfigError, EvmmError

if TYPE_CHECKING:
    from evmm.bench.runner import Plan

ALL_ROWS = (
    "boot",
    "memory",
    "blk",
    "net",
    "control",
    "density",
    "fs",
    "restore",
    "exec",
    "container",
    "seccomp",
)
DEFAULT_ROWS = ALL_ROWS  # a plain `evmm bench` runs every row
RUNS = 5
TESTHOST_BOOTS = 5  # the first test host, and fresh ones to resume in when one is lost
STALL = 600.0  # seconds without a word from the run inside before its test host counts as hung
HEARTBEAT = "heartbeat"
QUICK_RUNS = 2
DENSITY_RUNS = 2  # sweeps per side: one sweep to the limit takes ~100 boots, each slower than the last


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark evmm against QEMU microvm (boot, memory, virtio-blk, virtio-net, control, density, "
        "shared directories, restore, exec), evmm-oci against runc (container), and evmm's seccomp filters "
        "against none",
        description="Measure evmm and QEMU microvm side by side on the same KVM, kernel, initramfs and disk "
        "image, alternating runs; print a table and write results.json, results.md and ratios.png to OUT. "
        "Where this host's KVM cannot boot Linux, it all runs in one boot of the KVM test host.",
    )
    p.add_argument(
        "--runs", type=int, default=None, metavar="N", help=f"runs per side (default {RUNS}; 2 with --quick)"
    )
    p.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="results directory (default bench-results/DATE)"
    )
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_ROWS),
        metavar="ROWS",
        help=f"comma-separated rows of {','.join(ALL_ROWS)}",
    )
    p.add_argument("--quick", action="store_true", help="fewer runs and smaller workloads, for a smoke run")
    p.add_argument(
        "--machine",
        choices=("microvm", "standard"),
        default="microvm",
        help="evmm's board: microvm (against QEMU microvm) or standard (against QEMU q35, virtio-pci)",
    )
    p.add_argument(
        "--profile", action="store_true", help="one more evmm run per row under py-spy (not counted)"
    )
    p.add_argument(
        "--density-runs",
        type=int,
        default=None,
        metavar="N",
        help=f"sweeps of the density row (default {DENSITY_RUNS}; 1 with --quick)",
    )
    p.add_argument(
        "--testhost-memory",
        default="8G",
        metavar="SIZE",
        help="the KVM test host's RAM, when one is used (8G)",
    )
    p.add_argument(
        "--testhost-cpus",
        type=int,
        default=1,
        metavar="N",
        help="the KVM test host's vCPUs (1: with 2, QEMU TCG's SVM lost the test host or the QEMU guest "
        "several times per run here)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="limit for the whole run in the test host",
    )
    p.add_argument(
        "--resume", action="store_true", help="keep the rows OUT/results.json already has; measure the rest"
    )
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _rows(text: str) -> tuple[str, ...]:
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad or not rows:
        raise ConfigError(f"--only {text!r}: rows are {', '.join(ALL_ROWS)}")
    return tuple(r for r in ALL_ROWS if r in rows)


def _say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from evmm.bench.runner import Plan

    rows = _rows(args.only)
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else RUNS)
    if runs < 1:
        raise ConfigError(f"--runs {runs} must be at least 1")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(os.path.abspath(args.out if args.out is not None else Path("bench-results") / stamp))
    out.mkdir(parents=True, exist_ok=True)
    density_runs = args.density_runs if args.density_runs is not None else (1 if args.quick else DENSITY_RUNS)
    plan = Plan(
        rows=rows,
        runs=runs,
        quick=args.quick,
        out=out,
        profile=args.profile,
        density_runs=density_runs,
        resume=args.resume,
        machine=args.machine,
    )
    if args.inside or os.environ.get("EVMM_IN_TESTHOST") == "1" or _kvm_boots_linux():
        return _direct(plan, render=not args.inside, heartbeat=args.inside)
    return _in_testhost(plan, args)


def _kvm_boots_linux() -> bool:
    from evmm.hostkvm import probe

    return probe().can_boot_linux


def _direct(plan: Plan, *, render: bool, heartbeat: bool = False) -> int:
    from evmm.bench.runner import Runner

    say = _say
    if heartbeat:
        beat = plan.out / HEARTBEAT

        def say(text: str) -> None:
            _say(text)
            beat.touch()  # the outer side's sign of life: every run and every density VM says something

    Runner(plan, say).run()
    return _render(plan.out) if render else 0


def _in_testhost(plan: Plan, args: argparse.Namespace) -> int:
    """The whole benchmark in the KVM test host; a host lost part-way is replaced and the run resumed.

    Measured here: under a guest busy with exits the test host (QEMU TCG emulating SVM) occasionally dies
    (its kernel panicked) or hangs, which would end the benchmark with the rows after it unmeasured.
    """
    from evmm.assets import default_guest
    from evmm.testhost.runner import EXIT_NO_STATUS, EXIT_TIMEOUT

    default_guest()  # a missing guest is one line here, not an error deep inside the test host
    if "fs" in plan.rows:
        from evmm.bench.fs import prepare

        prepare()  # its guest is built here, natively, into the cache the test host reads
    timeout = args.timeout if args.timeout is not None else (7200.0 if plan.quick else 6 * 3600.0)
    _say(
        f"this host's KVM cannot boot Linux: running in the KVM test host ({args.testhost_memory}, "
        f"{args.testhost_cpus} vCPU)"
    )
    rc = 0
    resume = plan.resume
    for boot in range(1, TESTHOST_BOOTS + 1):
        inner = [sys.executable, "-m", "evmm", "bench", "--inside", "--out", str(plan.out)]
        inner += ["--runs", str(plan.runs), "--only", ",".join(plan.rows), "--machine", plan.machine]
        for flag, on in (("--quick", plan.quick), ("--profile", plan.profile), ("--resume", resume)):
            if on:
                inner.append(flag)
        if plan.density_runs is not None:
            inner += ["--density-runs", str(plan.density_runs)]
        outer = [sys.executable, "-m", "evmm.testhost", "run", "--share", str(plan.out)]
        outer += ["--memory", args.testhost_memory, "--cpus", str(args.testhost_cpus)]
        outer += ["--timeout", str(timeout), "--", *inner]
        rc = _watched(outer, plan.out / HEARTBEAT)
        if rc not in (EXIT_TIMEOUT, EXIT_NO_STATUS) or boot == TESTHOST_BOOTS:
            break
        _say(f"the test host was lost (exit {rc}); resuming in a fresh one ({boot + 1}/{TESTHOST_BOOTS})")
        resume = True
    if rc != 0:
        _say(f"the run in the test host exited {rc}; what it measured is below")
    rendered = _render(plan.out)
    return rc or rendered


def _watched(argv: list[str], heartbeat: Path) -> int:
    """Run the test host; one that has said nothing for ``STALL`` seconds is stopped (exit 124, as lost)."""
    from evmm.testhost.runner import EXIT_TIMEOUT

    heartbeat.touch()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            time.sleep(5)
            if time.time() - heartbeat.stat().st_mtime > STALL:
                _say(f"the test host said nothing for {STALL:g} s: stopping it")
                proc.terminate()  # the runner kills its QEMU on SIGTERM
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return EXIT_TIMEOUT
        return proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _render(out: Path) -> int:
    from evmm.bench import report
    from evmm.bench.results import Results
    from evmm.bench.runner import RESULTS

    path = out / RESULTS
    if not path.is_file():
        raise EvmmError(f"{path}: no results were written (see the output above)")
    results = Results.load(path)
    report.print_table(results)
    (out / "results.md").write_text(report.markdown(results))
    why = report.chart(results, out / "ratios.png")
    _say(f"results: {path}, {out / 'results.md'}" + (f", {out / 'ratios.png'}" if why is None else ""))
    if why is not None:
        _say(f"no chart: {why}")
    return 0
