"""The test tiers: ``unit`` (no KVM), ``kvm`` (the host's /dev/kvm, tiny guests), ``linux`` (boots Linux).

Where the host's KVM cannot boot Linux (a PVM-based /dev/kvm) but QEMU is installed, the selected linux-tier
tests are shared out among KVM test hosts running side by side (``EVMM_TESTHOST_SHARDS``, two by default),
each booted once unless it is lost (``Boots``): the first test starts, per test host, an inner
``python -m pytest NODEIDS`` through ``evmm testhost run`` with a shared results directory, and each outer item
then reports its own inner outcome.  Tests marked ``host_side`` (the test host's own tests) always run out
here instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from _pytest.mark.structures import Mark
from _pytest.nodes import Node

from evmm.hostkvm import HostKvm, probe
from evmm.testhost.runner import EXIT_NO_STATUS, EXIT_TIMEOUT
from tests.linux.harness import GuestKernelCrash

TIERS = ("unit", "kvm", "linux")
# Loaded before any fork (a child of a threaded parent must not dlopen): PR_SET_PDEATHSIG for the test host's
# runner, so that a killed pytest takes the runner, and through the runner's own PDEATHSIG QEMU, with it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _prctl(1, signal.SIGKILL, 0, 0, 0)


REPORT_ENV = "EVMM_TIER_REPORT"  # set for the inner run: where it writes one JSON line per test
TIMEOUT_ENV = "EVMM_LINUX_TIER_TIMEOUT"
DEFAULT_TIER_TIMEOUT = 2400.0  # seconds for the whole linux tier, so a hang fails CI instead of blocking it
STALL_ENV = "EVMM_LINUX_TIER_STALL"
# Seconds without a sign of life from the inner run (a test report, or its heartbeat) before a test host
# counts as hung: the heartbeat goes on through a long test, so only a test host that stopped running stops it.
DEFAULT_STALL = 90.0
SHARDS_ENV = "EVMM_TESTHOST_SHARDS"  # test hosts running the tier's tests side by side
DEFAULT_SHARDS = 2  # on two host cores: half the tier's time of one two-vCPU test host (docs/testing.md)
CPUS_ENV = "EVMM_TESTHOST_CPUS"  # each test host's vCPUs
DEFAULT_CPUS = 2  # with one test host; one each when there are more
HEARTBEAT = 10.0  # seconds between the inner run's signs of life (a test may run longer than the stall)
# Test host boots for one tier: the first, and fresh ones after lost ones.  A test host is lost now and
# then (QEMU TCG's nested SVM, docs/testing.md), sometimes several in one run under different tests, so a
# lost one is replaced; the tier's deadline bounds the time, this the count, and two boots in a row in which
# no test even started end it sooner (the test host cannot work here).
MAX_BOOTS = 8
MAX_BARREN_BOOTS = 2
HOST_SIDE = "host_side"
# Opt-in marks: selected with -m NAME (the inner run in the test host learns it from the environment,
# which it inherits), skipped otherwise.  docs/testing.md says what each holds and when it is run.
OPT_IN = {
    "engines": ("EVMM_ENGINE_TESTS", "a slow container-engine scenario"),
    "slow": ("EVMM_SLOW_TESTS", "one of the slowest linux-tier scenarios (big transfers, stress runs)"),
}
COST = "cost"  # @pytest.mark.cost(seconds): an outlier's time in a one-vCPU test host, to balance the shards
DEFAULT_COST = 30.0  # what most linux-tier tests take there


def heartbeat_path(report: Path) -> Path:
    return report.with_suffix(".alive")


def _beat(path: Path) -> None:
    """The inner run's sign of life for the outer side's stall check, every ``HEARTBEAT`` seconds."""
    while True:
        with contextlib.suppress(OSError):
            path.write_text(f"{time.time():.0f}\n")
        time.sleep(HEARTBEAT)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


@dataclass(frozen=True)
class TierPlan:
    kvm_skip: str | None  # reason to skip the kvm tier, or None
    kvm_header: str
    linux_mode: str  # "direct", "testhost" or "skip"
    linux_reason: str
    linux_header: str


def plan(host: HostKvm, in_testhost: bool, qemu: str | None) -> TierPlan:
    """Which KVM each tier uses here (pure: the inputs are what the host offers)."""
    kvm_header = f"kvm tier: /dev/kvm {host.module or 'unknown module'}" + (
        " (ring-0 emulated)" if host.module == "kvm_pvm" else ""
    )
    kvm_skip = None if host.present else host.reason
    if not host.present:
        kvm_header = f"kvm tier: skipped ({host.reason})"
    if in_testhost:
        where = f"/dev/kvm {host.module or 'unknown module'} inside the KVM test host"
        if host.can_boot_linux:
            return TierPlan(kvm_skip, kvm_header, "direct", "", f"linux tier: {where}")
        return TierPlan(kvm_skip, kvm_header, "skip", host.reason, f"linux tier: skipped ({host.reason})")
    if host.can_boot_linux:
        return TierPlan(kvm_skip, kvm_header, "direct", "", f"linux tier: /dev/kvm {host.module} (hardware)")
    if qemu is not None:
        return TierPlan(
            kvm_skip,
            kvm_header,
            "testhost",
            "",
            "linux tier: KVM test host (kvm_amd in QEMU TCG)",
        )
    reason = f"{host.reason}, and qemu-system-x86_64 is not installed for the KVM test host"
    return TierPlan(kvm_skip, kvm_header, "skip", reason, f"linux tier: skipped ({reason})")


def tier_of(path: Path, tests_dir: Path) -> str | None:
    try:
        first = path.relative_to(tests_dir).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in TIERS else None


def merge_outcome(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One test's start line and setup/call/teardown reports -> its outcome as pytest would count it.

    ``reruns`` carries the failures of the tries that were rerun (pytest-rerunfailures reports them as
    outcome ``rerun``), so the outer run can say that a test passed only the second time.
    """
    reruns = [r["text"] for r in reports if r["outcome"] == "rerun"]
    for r in reports:
        if r["outcome"] == "failed":
            return {"outcome": "failed", "text": f"[{r['when']}] {r['text']}", "reruns": reruns}
    for r in reports:
        if r["outcome"] == "skipped":
            return {"outcome": "skipped", "text": r["text"], "reruns": reruns}
    return {"outcome": "passed", "text": "", "reruns": reruns}


class Boots:
    """Across the test host boots of one tier: which tests are left, which failed by losing test hosts.

    A test host that exits before every test reported, or shows no sign of life for the stall limit, is
    lost; the tests that did not finish go on in a fresh boot.  The test that was running when it happened
    runs once more there; if a second test host is lost under it too, that test fails, naming both.  Pure
    (the boots' results come in as arguments), so the policy is unit-tested without a test host.
    """

    def __init__(self, nodeids: list[str]) -> None:
        self.remaining = list(nodeids)
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.lost: dict[str, str] = {}  # nodeid -> why a test host was lost while it ran
        self.notes: list[str] = []
        self.count = 0
        self.barren = 0  # boots in a row in which no test even started: the test host cannot work here
        self.ended = False  # pytest ended on its own with tests unreported: another boot would do the same

    def more(self) -> bool:
        return (
            bool(self.remaining)
            and not self.ended
            and self.count < MAX_BOOTS
            and self.barren < MAX_BARREN_BOOTS
        )

    def after(self, done: dict[str, dict[str, Any]], status: int, why: str | None) -> None:
        """One boot's reports (``done``: each test seen, ``complete`` once torn down), its runner's exit
        status, and why the tier stopped it (None when it ended by itself)."""
        self.count += 1
        finished = {k: v for k, v in done.items() if v["complete"] and k in self.remaining}
        self.outcomes.update(finished)
        self.barren = 0 if done else self.barren + 1
        self.remaining = [n for n in self.remaining if n not in self.outcomes]
        if not self.remaining:
            return
        if why is None and status not in (EXIT_TIMEOUT, EXIT_NO_STATUS):
            self.ended = True  # a collection error, say
            return
        if why is None:
            why = f"the test host exited {status} with {len(self.remaining)} tests unreported"
        running = next((n for n in self.remaining if n in done), None)
        if running is None:  # lost before any test started: nothing to blame; ``barren`` counts these
            self.notes.append(f"boot {self.count}: {why}, before a test started")
            return
        self.notes.append(f"boot {self.count}: {why}, while {running} ran")
        if running in self.lost:
            self.outcomes[running] = {
                "outcome": "failed",
                "text": f"two test hosts were lost while it ran: {self.lost[running]}; then {why}",
                "reruns": [],
            }
            self.remaining.remove(running)
        else:
            self.lost[running] = why

    def finish(self) -> dict[str, dict[str, Any]]:
        """The outcomes, each test that passed in a fresh test host carrying why the first was lost."""
        for nodeid, why in self.lost.items():
            if nodeid in self.outcomes and self.outcomes[nodeid]["outcome"] != "failed":
                self.outcomes[nodeid].setdefault("reruns", []).append(
                    f"E   a fresh KVM test host ran it after the first was lost: {why}"
                )
        return self.outcomes


def deal(nodeids: list[str], shards: int, cost: dict[str, float] | None = None) -> list[list[str]]:
    """``nodeids`` shared out among ``shards`` test hosts so that each has about as many seconds of tests.

    Longest first, each to the host with the least so far (tests without a ``cost`` mark count
    ``DEFAULT_COST``); then each host runs its tests in collection order.  Equal costs deal out like cards:
    neighbours, often alike, go to different hosts.  No empty shard.
    """
    cost = cost or {}
    shards = max(1, min(shards, len(nodeids)))
    order = {n: i for i, n in enumerate(nodeids)}
    loads = [0.0] * shards
    parts: list[list[str]] = [[] for _ in range(shards)]
    for n in sorted(nodeids, key=lambda n: (-cost.get(n, DEFAULT_COST), order[n])):
        least = loads.index(min(loads))
        parts[least].append(n)
        loads[least] += cost.get(n, DEFAULT_COST)
    return [sorted(p, key=order.__getitem__) for p in parts if p]


@dataclass
class Shard:
    """One test host's share of the tier: its tests across boots, and its log."""

    index: int
    boots: Boots
    results: Path

    @property
    def log(self) -> Path:
        return self.results / f"inner-{self.index}.log"


class RerunWarning(UserWarning):
    """A linux-tier test passed inside the test host only when rerun after its guest's kernel crashed."""


class InnerFailure(Exception):
    """A linux-tier test failed inside the test host; its text is the inner failure report."""


class RemoteItem(pytest.Item):
    """Stands in for a linux-tier test that runs inside the test host: reports that test's inner outcome."""

    def __init__(self, *, original: pytest.Item, plugin: TierPlugin, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.original = original
        self.plugin = plugin
        self.own_markers = list(original.own_markers)
        self.keywords.update(original.keywords)

    def runtest(self) -> None:
        result = self.plugin.inner_result(self.nodeid)
        for text in result.get("reruns", []):
            lines = text.strip().splitlines()
            errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
            first = errors[0] if errors else (lines[-1] if lines else "(no text)")
            warnings.warn(RerunWarning(f"rerun inside the KVM test host after: {first}"), stacklevel=1)
        if result["outcome"] == "skipped":
            pytest.skip(f"(in the KVM test host) {result['text']}")
        if result["outcome"] == "failed":
            raise InnerFailure(result["text"])

    def iter_markers_with_node(self, name: str | None = None) -> Iterator[tuple[Node, Mark]]:
        # A skipif's condition was evaluated here, on the host, where the test does not run (e.g. the engines'
        # "no cgroup v2" on a cgroup v1 host): it would report the test skipped whatever happened inside.
        # The inner run evaluates it where the test runs and reports a skip, with its reason, if it holds.
        for node, mark in super().iter_markers_with_node(name):
            if mark.name != "skipif":
                yield node, mark

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, InnerFailure):
            return f"failed inside the KVM test host:\n{excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original.reportinfo()


class TierPlugin:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.tests_dir = Path(__file__).parent
        self.in_testhost = os.environ.get("EVMM_IN_TESTHOST") == "1"
        self.plan = plan(probe(), self.in_testhost, shutil.which("qemu-system-x86_64"))
        self.tier_timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIER_TIMEOUT))
        self.inner_nodeids: list[str] = []
        self.inner_cost: dict[str, float] = {}
        self.inner: dict[str, dict[str, Any]] | None = None
        self.inner_note = ""
        self.inner_kvm = ""
        self.inner_summary = ""
        self.inner_logs: list[Path] = []
        self.shards = int(os.environ.get(SHARDS_ENV, DEFAULT_SHARDS))
        self.testhost_cpus = int(os.environ.get(CPUS_ENV, DEFAULT_CPUS if self.shards == 1 else 1))
        self.report_path = os.environ.get(REPORT_ENV)
        self.phases: dict[str, list[dict[str, Any]]] = {}
        self.alarm_armed = False

    # -- which tests, where -------------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        linux = self.plan.linux_header
        if self.plan.linux_mode == "testhost":
            hosts = "one test host" if self.shards == 1 else f"{self.shards} test hosts side by side"
            linux += f": {hosts}, {self.testhost_cpus} vCPU(s) each (a fresh one if one is lost)"
        return [self.plan.kvm_header, linux]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        # tryfirst: the tier marks must be on the items before `-m` deselects by them.
        selects_long = "long" in (config.option.markexpr or "")
        selected = set()
        for mark, (env, _) in OPT_IN.items():
            if mark in (config.option.markexpr or ""):
                os.environ[env] = "1"
            if os.environ.get(env) == "1":
                selected.add(mark)
        for item in items:
            tier = tier_of(Path(str(item.path)), self.tests_dir)
            if tier is not None:
                item.add_marker(getattr(pytest.mark, tier))
            if item.get_closest_marker("long") and not selects_long:
                item.add_marker(pytest.mark.skip(reason="a long fuzzing run: select it with -m long"))
            for mark, (_, what) in OPT_IN.items():
                if item.get_closest_marker(mark) and mark not in selected:
                    item.add_marker(pytest.mark.skip(reason=f"{what}: select it with -m {mark}"))
            if tier == "kvm" and self.plan.kvm_skip:
                item.add_marker(pytest.mark.skip(reason=f"kvm tier: {self.plan.kvm_skip}"))
            if tier == "linux":
                self._place_linux(item)

    def _place_linux(self, item: pytest.Item) -> None:
        host_side = item.get_closest_marker(HOST_SIDE) is not None
        if host_side and self.in_testhost:
            item.add_marker(pytest.mark.skip(reason="a test of the test host itself: runs outside it"))
        elif host_side and shutil.which("qemu-system-x86_64") is None:
            item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 is not installed"))
        elif not host_side and self.plan.linux_mode == "skip":
            item.add_marker(pytest.mark.skip(reason=f"linux tier: {self.plan.linux_reason}"))
        elif not host_side and self.plan.linux_mode == "direct":
            # A guest that dies (an oops before ready, a triple fault) is rerun once (see GuestKernelCrash);
            # any other failure is final.
            item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[GuestKernelCrash]))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # After `-m`/`-k` deselection: swap each remaining inner linux test for a stand-in reporting its result.
        if self.plan.linux_mode != "testhost":
            return
        items = session.items
        for i, item in enumerate(items):
            if tier_of(Path(str(item.path)), self.tests_dir) != "linux" or item.get_closest_marker(HOST_SIDE):
                continue
            if item.get_closest_marker("skip"):
                continue
            assert item.parent is not None
            items[i] = RemoteItem.from_parent(item.parent, name=item.name, original=item, plugin=self)
            self.inner_nodeids.append(item.nodeid)
            if (mark := item.get_closest_marker(COST)) is not None:
                self.inner_cost[item.nodeid] = float(mark.args[0])

    # -- the inner run (outer side) -----------------------------------------------------------------------

    def inner_result(self, nodeid: str) -> dict[str, Any]:
        if self.inner is None:
            self.inner = self._run_inner()
        result = self.inner.get(nodeid)
        if result is None:
            return {"outcome": "failed", "text": f"no result came back from the test host. {self.inner_note}"}
        return result

    def _run_inner(self) -> dict[str, dict[str, Any]]:
        """Run the selected tests in the test host(s); in a fresh one when one dies or hangs part-way.

        The test host (QEMU TCG emulating SVM, with a real KVM inside) is itself not perfectly reliable: seen
        here, its kernel once panicked ("corrupted stack end detected inside scheduler") and it sometimes
        stops for good, silently, while a guest of its KVM is busy.  A test host that exits before every test
        reported, or reports nothing for ``STALL_ENV`` seconds, is killed; ``Boots`` decides what runs next.
        With ``SHARDS_ENV`` > 1 the tests are dealt out to that many test hosts running side by side.
        """
        from evmm.assets.generic import build_generic_guest
        from evmm.assets.guest import build_default_guest
        from evmm.testhost.assets import build_testhost_assets

        # A fresh machine needs no extra step: build what the tier needs (a no-op when cached).
        build_default_guest()
        build_testhost_assets()
        build_generic_guest()  # the snapshot clone test's guest: Debian's generic kernel has VMGenID
        results = Path(tempfile.mkdtemp(prefix="evmm-linux-tier-"))
        stall = float(os.environ.get(STALL_ENV, DEFAULT_STALL))
        started = time.monotonic()
        deadline = started + self.tier_timeout
        shards = [
            Shard(i, Boots(part), results)
            for i, part in enumerate(deal(self.inner_nodeids, self.shards, self.inner_cost))
        ]
        self.inner_logs = [sh.log for sh in shards]
        threads = [
            threading.Thread(target=self._run_shard, args=(sh, stall, deadline), name=f"testhost-{sh.index}")
            for sh in shards
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        outcomes: dict[str, dict[str, Any]] = {}
        notes, tails = [], []
        for sh in shards:
            outcomes.update(sh.boots.finish())
            notes += [f"test host {sh.index}, {n}" if len(shards) > 1 else n for n in sh.boots.notes]
            if sh.boots.remaining:
                lines = sh.log.read_text(errors="replace").splitlines()[-40:]
                tails.append(f"the last lines of {sh.log}:\n" + "\n".join(lines))
        remaining = sum(len(sh.boots.remaining) for sh in shards)
        boots = sum(sh.boots.count for sh in shards)
        self.inner_note = (
            f"{remaining} tests never reported after {boots} test host boots in {elapsed:.0f} s "
            f"({'; '.join(notes) or 'no boot was lost'}); " + "\n".join(tails)
        )
        where = f"{len(shards)} test hosts side by side, " if len(shards) > 1 else ""
        self.inner_summary = (
            f"{len(self.inner_nodeids)} tests in {where}{boots} KVM test host boot(s), {elapsed:.0f} s"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
        return outcomes

    def _run_shard(self, shard: Shard, stall: float, deadline: float) -> None:
        rootdir = Path(str(self.config.rootpath))
        boots = shard.boots
        try:
            while boots.more() and time.monotonic() < deadline:
                number = boots.count + 1
                report = shard.results / f"report-{shard.index}-{number}.jsonl"
                status, why = self._boot_once(rootdir, shard, report, stall, deadline, number)
                boots.after(self._read_report(report), status, why)
        except Exception as e:  # a thread's error would otherwise vanish: its tests report this instead
            boots.notes.append(f"the runner of test host {shard.index} failed: {e!r}")

    def _boot_once(
        self, rootdir: Path, shard: Shard, report: Path, stall: float, deadline: float, boot: int
    ) -> tuple[int, str | None]:
        """One test host running ``nodeids``: its exit status, and why it was stopped (None if it ended)."""
        # -v: the log names the test that was running if the test host is killed; durations: where the time went.
        inner = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-v",
            "--durations=10",
            # A test still running after 10 minutes gets every thread's traceback in the log.
            "-o",
            "faulthandler_timeout=600",
            "--rootdir",
            str(rootdir),
        ]
        left = max(60.0, deadline - time.monotonic())
        argv = [
            *(sys.executable, "-m", "evmm.testhost", "run", "--share", str(shard.results)),
            *("--cpus", str(self.testhost_cpus)),
            *("--timeout", f"{left:g}", "--", *inner, *shard.boots.remaining),
        ]
        env = {**os.environ, REPORT_ENV: str(report), "PYTHONDONTWRITEBYTECODE": "1"}
        with open(shard.log, "ab") as log:
            log.write(f"\n==== test host boot {boot}: {len(shard.boots.remaining)} tests\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                preexec_fn=_die_with_parent,
                cwd=rootdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            why: str | None = None
            alive = heartbeat_path(report)
            last_sign, last_change = None, time.monotonic()
            while proc.poll() is None:
                time.sleep(2)
                sign = (_size(report), _mtime(alive))
                now = time.monotonic()
                if sign != last_sign:
                    last_sign, last_change = sign, now
                elif now - last_change > stall:
                    why = f"the test host gave no sign of life (report or heartbeat) for {stall:g} s"
                elif now > deadline + 120:
                    why = f"the tier ran past its {self.tier_timeout:g} s timeout ({TIMEOUT_ENV})"
                if why is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)  # the runner kills its QEMU on the way out
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    break
            return proc.returncode, why

    def _read_report(self, path: Path) -> dict[str, dict[str, Any]]:
        """Each test seen in ``path``, merged; ``complete`` once its teardown was reported."""
        phases: dict[str, list[dict[str, Any]]] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return {}
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short when the test host was killed
            if "header" in entry:
                self.inner_kvm = entry["header"]
            else:
                phases.setdefault(entry["nodeid"], []).append(entry)
        merged = {}
        for nodeid, reports in phases.items():
            outcome = merge_outcome(reports)
            outcome["complete"] = any(r["when"] == "teardown" for r in reports)
            merged[nodeid] = outcome
        return merged

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.inner is not None:
            terminalreporter.write_line(f"{self.inner_kvm or 'linux tier'}: {self.inner_summary}")
            for log in self.inner_logs:
                terminalreporter.write_line(f"inner run's log: {log}")

    # -- the inner run (inner side) and the tier timeout -------------------------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.report_path:
            self._append({"header": self.plan.linux_header})
            threading.Thread(
                target=_beat,
                args=(heartbeat_path(Path(self.report_path)),),
                name="tier-heartbeat",
                daemon=True,
            ).start()

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.exitstatus = int(exitstatus)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        # The inner run, once its summary is out: exit now.  A test that failed half-way can leave a thread
        # blocked (in accept(), say), and the interpreter would wait on it at exit, with the test host, and
        # the heartbeat thread keeping the tier from calling that a stall, until the tier's whole timeout.
        if self.report_path and getattr(self, "exitstatus", None) is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exitstatus)

    def _append(self, entry: dict[str, Any]) -> None:
        assert self.report_path is not None
        # One line per phase, flushed at once, so whatever finished survives a killed test host.
        with open(self.report_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        # Which test a lost test host was running.  Not left to the setup report: pytest-rerunfailures logs
        # a flaky-marked test's reports only once all its phases are done, so a test host lost mid-test
        # would otherwise leave no trace of the test it died under.
        if self.report_path:
            self._append({"nodeid": nodeid, "when": "start", "outcome": "started", "text": ""})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.report_path:
            return
        if report.skipped and isinstance(report.longrepr, tuple):
            text = str(report.longrepr[2])
        else:
            text = report.longreprtext
        self._append(
            {
                "nodeid": report.nodeid,
                "when": report.when,
                "outcome": report.outcome,
                "text": text,
                "duration": round(report.duration, 2),
            }
        )

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # Direct mode: the whole tier shares one deadline; a guest that hangs past it fails the test it is in.
        if self.plan.linux_mode != "direct" or tier_of(Path(str(item.path)), self.tests_dir) != "linux":
            return
        if not self.alarm_armed and hasattr(signal, "SIGALRM"):
            self.alarm_armed = True
            limit = self.tier_timeout

            def expired(_signum: int, _frame: FrameType | None) -> None:
                pytest.fail(f"the linux tier ran past its {limit:g} s timeout ({TIMEOUT_ENV})", pytrace=False)

            signal.signal(signal.SIGALRM, expired)
            signal.alarm(int(limit))
