"""Tests that lose their KVM test host, once each, to exercise the tier's recovery end to end.

Not collected by a normal run (the file name does not match ``test_*.py``); ``test_testhost.py``'s
``test_the_tier_survives_lost_test_hosts`` runs this file through the tier and checks what it reports.
Each test destroys its test host only inside one (``EVMM_IN_TESTHOST``), only when asked
(``EVMM_TIER_SELFTEST``), and only the first time: a mark in the tier's results share, which outlives the
test host, tells the rerun in the fresh one to pass.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

SELFTEST_ENV = "EVMM_TIER_SELFTEST"


def _first_time(name: str) -> bool:
    if os.environ.get("EVMM_IN_TESTHOST") != "1" or os.environ.get(SELFTEST_ENV) != "1":
        pytest.skip("destroys its KVM test host: run only by test_the_tier_survives_lost_test_hosts")
    mark = Path(os.environ["EVMM_TIER_REPORT"]).parent / f"selftest-{name}"
    if mark.exists():
        return False
    mark.write_text("lost once\n")  # over 9p to the host, synchronously, before the test host goes
    return True


def test_a_test_host_that_dies() -> None:
    if _first_time("dies"):
        # L1's kernel panics (sysrq c); panic=-1 reboots it and QEMU, run with -no-reboot, exits.
        Path("/proc/sysrq-trigger").write_text("c")


def test_a_test_host_that_goes_silent() -> None:
    if _first_time("silent"):
        # No more reports or heartbeats from this run: to the tier, a test host that stopped.
        os.kill(os.getpid(), signal.SIGSTOP)


def test_the_rest_runs() -> None:
    assert os.environ.get("EVMM_IN_TESTHOST") == "1"
