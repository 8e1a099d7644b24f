"""The start-up laps ``evmm run -v`` logs, in the form scripts/bench_startup.py reads back."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from evmm.startup import Laps

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_startup.py"


def test_each_step_is_the_time_since_the_one_before_and_the_script_reads_them_back() -> None:
    laps = Laps(start=time.monotonic())
    time.sleep(0.02)
    laps.lap("imports")
    laps.lap("kvm")
    time.sleep(0.01)
    first = time.monotonic()
    line = laps.line(first)
    spec = importlib.util.spec_from_file_location("bench_startup", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    m = script.LINE.search(f"evmm: {line}; 123 ms since exec")
    assert m is not None, line
    assert float(m.group(1)) == round(laps.start, 6) and float(m.group(3)) == round(first, 6)
    steps = {s: float(ms) for s, ms in (script.LAP.fullmatch(p).groups() for p in m.group(2).split(", "))}
    assert list(steps) == ["imports", "kvm", "threads"]
    assert steps["imports"] >= 20 and steps["kvm"] < 20 and steps["threads"] >= 10
    # Together they are main -> first KVM_RUN.
    assert abs(sum(steps.values()) - (first - laps.start) * 1000) < 0.5
