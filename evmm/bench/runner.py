"""Run the benchmark rows on this host's KVM: every row, every run, the sides alternating (A B A B ...).

Results are saved to ``OUT/results.json`` after every run, so a crash or a timeout of the test host still
leaves what was measured, and with ``resume`` a later run keeps the rows that finished and measures the rest
from the start (``evmm bench`` does so in a fresh test host when one is lost part-way); a run that fails records its reason for its side (the table then shows it), and the
full text goes to ``OUT/failures.log``.  With ``profile``, each profiled row gets one more evmm run, not
counted, with py-spy attached (``OUT/profile-ROW.txt``).
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evmm.bench import vmm
from evmm.bench.blk import BlkRow
from evmm.bench.boot import BootRow
from evmm.bench.container import ContainerRow
from evmm.bench.context import Context, Row, Watch
from evmm.bench.control import ControlRow
from evmm.bench.density import DensityRow
from evmm.bench.exec import ExecRow
from evmm.bench.fs import FsRow
from evmm.bench.net import NetRow
from evmm.bench.overhead import MemoryRow
from evmm.bench.profile import Profiler
from evmm.bench.restore import RestoreRow
from evmm.bench.results import Results
from evmm.bench.seccomp import SeccompRow
from evmm.bench.vmm import EVMM
from evmm.record import record

ROWS: dict[str, Callable[[], Row]] = {
    "boot": BootRow,
    "memory": MemoryRow,
    "blk": BlkRow,
    "net": NetRow,
    "control": ControlRow,
    "density": DensityRow,
    "fs": FsRow,
    "seccomp": SeccompRow,
    "restore": RestoreRow,
    "exec": ExecRow,
    "container": ContainerRow,
}
PROFILED = ("boot", "blk", "net", "control")
RESULTS = "results.json"


@record(frozen=True)
class Plan:
    rows: tuple[str, ...]
    runs: int
    quick: bool
    out: Path
    profile: bool = False
    density_runs: int | None = None  # default: runs
    resume: bool = False  # keep the finished rows of OUT/results.json
    machine: str = "microvm"  # microvm (against QEMU microvm) or standard (against QEMU q35)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def tsc_khz() -> int:
    """The TSC rate KVM gives guests here (what evmm passes as tsc_early_khz), or 0 when unknown."""
    try:
        from evmm.kvm import Kvm

        with Kvm() as kvm:
            vm = kvm.create_vm()
            try:
                vcpu = vm.create_vcpu(0)
                try:
                    return int(vcpu.get_tsc_khz())
                finally:
                    vcpu.close()
            finally:
                vm.close()
    except Exception:
        return 0


def kernel_cmdline(machine: str = "microvm") -> str:
    """One command line for both VMMs: a quiet serial console plus every word evmm's board would add.

    Given explicitly, evmm adds nothing of its own, and QEMU's guest gets exactly the same words.  The
    standard board (and q35) keep PCI.
    """
    words = ["console=ttyS0", "quiet", "reboot=k", *(["pci=off"] if machine == "microvm" else [])]
    words += ["i8042.noaux", "panic=-1"]
    khz = tsc_khz()
    if khz:
        words.append(f"tsc_early_khz={khz}")
    return " ".join(words)


def _version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr).strip() else "unknown"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return r.stdout.strip() or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_meta(plan: Plan, append: str, ctx: Context) -> dict[str, Any]:
    from evmm.hostkvm import probe

    spec = ctx.spec(128)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {
            "in_testhost": os.environ.get("EVMM_IN_TESTHOST") == "1",
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "kvm": probe().module,
            "memory_mib": _mem_total_mib(),
        },
        "evmm": _git_commit(),
        "python": sys.version.split()[0],
        "qemu": _version([vmm.QEMU_BINARY, "--version"]),
        "guest_kernel": ctx.guest.kernel_version,
        "cmdline": append,
        "machine": plan.machine,
        "runs": plan.runs,
        "quick": plan.quick,
        "argv": {
            "evmm": " ".join(vmm.evmm_argv(spec)),
            "qemu": " ".join(vmm.qemu_argv(spec)),
        },
    }


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


class Runner:
    def __init__(self, plan: Plan, say: Callable[[str], None]) -> None:
        self.plan = plan
        self.say = say
        self.results = Results()
        self.path = plan.out / RESULTS
        self.failures = plan.out / "failures.log"

    def _log_failure(self, what: str, e: BaseException) -> None:
        with self.failures.open("a") as f:
            f.write(f"==== {what}\n{''.join(traceback.format_exception(e))}\n")

    def run(self) -> Results:
        from evmm.assets import default_guest

        guest = default_guest()
        workdir = Path(tempfile.mkdtemp(prefix="evmm-bench-", dir="/tmp"))
        append = kernel_cmdline(self.plan.machine)
        ctx = Context(
            guest=guest,
            append=append,
            workdir=workdir,
            quick=self.plan.quick,
            say=self.say,
            machine=self.plan.machine,
        )
        rows = {name: ROWS[name]() for name in self.plan.rows}
        finished: dict[str, Any] = {}
        if self.plan.resume and self.path.is_file():
            self.results = Results.load(self.path)
            finished = dict(self.results.meta.get("row_seconds", {}))
            for name in rows:
                if name not in finished:
                    self.results.clear_row(name)
            self.say(f"resuming: {', '.join(finished) or 'no row'} already done")
        for row in rows.values():
            for spec in row.metrics():
                self.results.declare(spec)
        profiles = self.results.meta.get("profiles", {})
        boots = int(self.results.meta.get("boots", 0)) + 1
        self.results.meta = host_meta(self.plan, append, ctx)
        self.results.meta.update(profiles=profiles, row_seconds=finished, boots=boots)
        self.results.save(self.path)
        rows = {name: row for name, row in rows.items() if name not in finished}
        if not guest.tools_initramfs.is_file():
            for name in ("blk", "net", "fs"):
                if name in rows:
                    for side in rows[name].sides:
                        self.results.fail_row(name, side.name, "no tools initramfs: run `evmm assets`")
                    del rows[name]
        try:
            for name, row in rows.items():
                self._row(name, row, ctx)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.results.meta["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.results.save(self.path)
        return self.results

    def _row(self, name: str, row: Row, ctx: Context) -> None:
        started = time.monotonic()
        try:
            row.setup(ctx)
        except Exception as e:
            self._log_failure(f"{name} setup", e)
            for side in row.sides:
                self.results.fail_row(name, side.name, f"setup: {one_line(e)}")
            self.results.save(self.path)
            self.say(f"{name}: setup failed: {one_line(e)}")
            return
        try:
            runs = self.plan.density_runs if name == "density" and self.plan.density_runs else self.plan.runs
            for i in range(runs):
                for side in row.sides:
                    self._once(name, row, ctx, side, i, runs)
            if self.plan.profile and name in PROFILED:
                self._profile(name, row, ctx)
        finally:
            row.teardown(ctx)
        for spec in row.metrics():
            for check in self.results[spec.key].check_work():
                self.say(f"{name}: {spec.key}: {check}")
        self.results.meta.setdefault("row_seconds", {})[name] = round(time.monotonic() - started, 1)
        self.results.save(self.path)

    def _once(self, name: str, row: Row, ctx: Context, side: vmm.Side, i: int, runs: int) -> None:
        t = time.monotonic()
        try:
            m = row.measure(side, ctx, None)
        except Exception as e:
            self._log_failure(f"{name} run {i + 1} {side.name}", e)
            self.results.fail_row(name, side.name, one_line(e))
            self.say(f"[{name} {i + 1}/{runs}] {side.name}: FAILED {one_line(e)}")
        else:
            for key, value in m.values.items():
                self.results[key].add(side.name, value)
            for key, amount in m.work.items():
                self.results[key].add_work(side.name, amount)
            for key, text in m.notes.items():
                self.results[key].note(side.name, text)
            shown = ", ".join(f"{k.split('.', 1)[1]} {v:.4g}" for k, v in m.values.items())
            self.say(f"[{name} {i + 1}/{runs}] {side.name} ({time.monotonic() - t:.0f} s): {shown}")
        self.results.save(self.path)

    def _profile(self, name: str, row: Row, ctx: Context) -> None:
        why = Profiler.available()
        if why is not None:
            self.results.meta["profiles"][name] = {"error": why}
            return
        profiler = Profiler(self.plan.out / f"profile-{name}.raw")
        watch: Watch = profiler.attach
        self.say(f"[{name} profile] evmm under py-spy (not counted)")
        try:
            row.measure(EVMM, ctx, watch)
        except Exception as e:
            self._log_failure(f"{name} profile run", e)
            self.say(f"[{name} profile] the run failed: {one_line(e)}")
        summary, errors = profiler.finish()
        (self.plan.out / f"profile-{name}.txt").write_text(summary.table())
        entry: dict[str, Any] = summary.to_json()
        if errors:
            entry["errors"] = errors
        self.results.meta["profiles"][name] = entry
        self.say(f"[{name} profile] {summary.samples} samples -> profile-{name}.txt")
