"""The test tiers: ``unit`` (no KVM), ``kvm`` (the host's /dev/kvm, tiny guests), ``linux`` (boots Linux).

Where the host's KVM cannot boot Linux (a PVM-based /dev/kvm) but QEMU is installed, every selected linux-tier
test runs in ONE boot of the KVM test host: the first of them starts an inner ``python -m pytest NODEIDS``
through ``evmm testhost run`` with a shared results directory, and each outer item then reports its own inner
outcome.  Tests marked ``host_side`` (the test host's own tests) always run out here instead.
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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

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
DEFAULT_STALL = 120.0
CPUS_ENV = "EVMM_TESTHOST_CPUS"  # the test host's vCPUs for the tier
DEFAULT_CPUS = 2
HEARTBEAT = 10.0  # seconds between the inner run's signs of life (a test may run longer than the stall)
MAX_BOOTS = 4  # test host boots for one tier: the first, and fresh ones after lost ones
HOST_SIDE = "host_side"


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
            "linux tier: KVM test host (kvm_amd in QEMU TCG), one boot for the tier (another if one is lost)",
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
    """One test's setup/call/teardown reports -> its outcome as pytest would count it.

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
        self.inner: dict[str, dict[str, Any]] | None = None
        self.inner_note = ""
        self.inner_kvm = ""
        self.inner_summary = ""
        self.inner_log: Path | None = None
        self.report_path = os.environ.get(REPORT_ENV)
        self.phases: dict[str, list[dict[str, Any]]] = {}
        self.alarm_armed = False

    # -- which tests, where -------------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        return [self.plan.kvm_header, self.plan.linux_header]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        # tryfirst: the tier marks must be on the items before `-m` deselects by them.
        selects_long = "long" in (config.option.markexpr or "")
        for item in items:
            tier = tier_of(Path(str(item.path)), self.tests_dir)
            if tier is not None:
                item.add_marker(getattr(pytest.mark, tier))
            if item.get_closest_marker("long") and not selects_long:
                item.add_marker(pytest.mark.skip(reason="a long fuzzing run: select it with -m long"))
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

    # -- the inner run (outer side) -----------------------------------------------------------------------

    def inner_result(self, nodeid: str) -> dict[str, Any]:
        if self.inner is None:
            self.inner = self._run_inner()
        result = self.inner.get(nodeid)
        if result is None:
            return {"outcome": "failed", "text": f"no result came back from the test host. {self.inner_note}"}
        return result

    def _run_inner(self) -> dict[str, dict[str, Any]]:
        """Run the selected tests in the test host; in a fresh one when it dies or hangs part-way.

        The test host (QEMU TCG emulating SVM, with a real KVM inside) is itself not perfectly reliable: seen
        here, its kernel once panicked ("corrupted stack end detected inside scheduler") and once went idle
        for good, in both cases while a guest of its KVM was busy.  A test host that exits before every test
        reported, or reports nothing for ``STALL_ENV`` seconds, is killed; the tests that had not finished go
        on in a new boot.  The test that was running when it happened runs once more there; if the second
        test host fails under it too, that test fails, naming both.
        """
        from evmm.assets.guest import build_default_guest
        from evmm.testhost.assets import build_testhost_assets

        # A fresh machine needs no extra step: build what the tier needs (a no-op when cached).
        build_default_guest()
        build_testhost_assets()
        results = Path(tempfile.mkdtemp(prefix="evmm-linux-tier-"))
        self.inner_log = results / "inner.log"
        rootdir = Path(str(self.config.rootpath))
        stall = float(os.environ.get(STALL_ENV, DEFAULT_STALL))
        started = time.monotonic()
        deadline = started + self.tier_timeout
        outcomes: dict[str, dict[str, Any]] = {}
        lost: dict[str, str] = {}  # nodeid -> why its first test host was lost under it
        remaining = list(self.inner_nodeids)
        boots = 0
        notes: list[str] = []
        while remaining and boots < MAX_BOOTS and time.monotonic() < deadline:
            boots += 1
            report = results / f"report-{boots}.jsonl"
            status, why = self._boot_once(rootdir, results, report, remaining, stall, deadline, boots)
            done = self._read_report(report)
            outcomes.update({k: v for k, v in done.items() if v["complete"]})
            remaining = [n for n in remaining if n not in outcomes]
            if not remaining:
                break
            if why is None and status not in (EXIT_TIMEOUT, EXIT_NO_STATUS):
                break  # pytest itself ended there (a collection error, say): another boot would do the same
            if why is None:
                why = f"the test host exited {status} with {len(remaining)} tests unreported"
            running = next((n for n in remaining if n in done), remaining[0])
            notes.append(f"boot {boots}: {why}, while {running} ran")
            if running in lost:
                outcomes[running] = {
                    "outcome": "failed",
                    "text": f"two test hosts were lost while it ran: {lost[running]}; then {why}",
                    "reruns": [],
                }
                remaining.remove(running)
            else:
                lost[running] = why
        for nodeid, why in lost.items():
            if nodeid in outcomes and outcomes[nodeid]["outcome"] != "failed":
                outcomes[nodeid].setdefault("reruns", []).append(
                    f"E   a fresh KVM test host ran it after the first was lost: {why}"
                )
        elapsed = time.monotonic() - started
        tail = "\n".join(self.inner_log.read_text(errors="replace").splitlines()[-40:])
        self.inner_note = (
            f"{len(remaining)} tests never reported after {boots} test host boots in {elapsed:.0f} s "
            f"({'; '.join(notes) or 'no boot was lost'}); the last lines of {self.inner_log}:\n{tail}"
        )
        self.inner_summary = (
            f"{len(self.inner_nodeids)} tests in {boots} KVM test host boot(s), {elapsed:.0f} s"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
        return outcomes

    def _boot_once(
        self,
        rootdir: Path,
        results: Path,
        report: Path,
        nodeids: list[str],
        stall: float,
        deadline: float,
        boot: int,
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
            *(sys.executable, "-m", "evmm.testhost", "run", "--share", str(results)),
            *("--cpus", os.environ.get(CPUS_ENV, str(DEFAULT_CPUS))),
            *("--timeout", f"{left:g}", "--", *inner, *nodeids),
        ]
        env = {**os.environ, REPORT_ENV: str(report), "PYTHONDONTWRITEBYTECODE": "1"}
        assert self.inner_log is not None
        with open(self.inner_log, "ab") as log:
            log.write(f"\n==== test host boot {boot}: {len(nodeids)} tests\n".encode())
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
            terminalreporter.write_line(f"inner run's log: {self.inner_log}")

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
