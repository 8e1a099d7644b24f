"""Benchmark results: samples per metric and side, their summary (median, min, max, ratio) and the JSON file.

Pure: no I/O beyond ``load``/``save``.  A *metric* is one table row (``boot.ready``); a *side* is one VMM
configuration (``evmm``, ``evmm-vhost``, ``qemu``, ``qemu-vhost``).  Each metric names the sides that fill its
evmm and QEMU columns, so the vhost=on rows compare evmm's vhost side with QEMU's.  A side that could not run keeps its
failure reasons, and a row whose samples are missing shows them instead of a number: no row is dropped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from evmm.record import record

Better = Literal["lower", "higher"]
SCHEMA = 1
EVMM = "evmm"
QEMU = "qemu"


@record(frozen=True)
class MetricSpec:
    key: str  # "boot.ready"
    row: str  # the benchmark row it belongs to: boot, memory, blk, net, control, density
    title: str  # what the table shows
    unit: str  # ms, MiB, MB/s, IOPS, Gbit/s, us, VMs
    better: Better
    qemu_side: str = QEMU  # the side that fills the QEMU column
    note: str = ""
    evmm_side: str = EVMM  # the side that fills the evmm column


@record(frozen=True)
class Summary:
    n: int
    median: float
    min: float
    max: float


@record
class Metric:
    spec: MetricSpec
    samples: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    # The work each run did (fio's io_bytes, iperf3's bytes), per side: both sides must have done the same.
    work: dict[str, list[float]] = field(default_factory=dict)
    checks: list[str] = field(
        default_factory=list
    )  # failed "same work" checks: the row is then not comparable
    notes: list[str] = field(default_factory=list)  # remarks from the runs (a sweep that hit its limit)

    def add(self, side: str, value: float) -> None:
        self.samples.setdefault(side, []).append(float(value))

    def note(self, side: str, text: str) -> None:
        line = f"{side}: {text}"
        if line not in self.notes:
            self.notes.append(line)

    def add_work(self, side: str, amount: float) -> None:
        self.work.setdefault(side, []).append(float(amount))

    def check_work(self) -> list[str]:
        """Every run of both sides did the same work; otherwise one line per difference (kept in ``checks``)."""
        sides = [s for s in (self.spec.evmm_side, self.spec.qemu_side) if self.work.get(s)]
        amounts = {a for s in sides for a in self.work[s]}
        self.checks = []
        if len(amounts) > 1:
            seen = ", ".join(f"{s}: {sorted(set(self.work[s]))}" for s in sides)
            self.checks.append(f"the sides did different work ({seen})")
        return self.checks

    def fail(self, side: str, reason: str) -> None:
        self.failures.setdefault(side, []).append(reason)

    def summary(self, side: str) -> Summary | None:
        return summarize(self.samples.get(side, []))

    def ratio(self) -> float | None:
        """evmm's median over QEMU's; None when either is missing or QEMU's is zero."""
        a, b = self.summary(self.spec.evmm_side), self.summary(self.spec.qemu_side)
        if a is None or b is None or b.median == 0:
            return None
        return a.median / b.median

    def evmm_better(self) -> bool | None:
        r = self.ratio()
        if r is None:
            return None
        return r < 1 if self.spec.better == "lower" else r > 1

    def why_missing(self, side: str) -> str:
        reasons = self.failures.get(side, [])
        if not reasons:
            return "not run"
        first = reasons[0]
        more = len(reasons) - 1
        return f"failed: {first}" + (f" (+{more} more)" if more else "")


def summarize(values: list[float]) -> Summary | None:
    if not values:
        return None
    return Summary(len(values), statistics.median(values), min(values), max(values))


@record
class Results:
    metrics: dict[str, Metric] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def declare(self, spec: MetricSpec) -> Metric:
        m = self.metrics.get(spec.key)
        if m is None:
            m = self.metrics[spec.key] = Metric(spec)
        return m

    def __getitem__(self, key: str) -> Metric:
        return self.metrics[key]

    def clear_row(self, row: str) -> None:
        """Forget what a row measured (it is measured again from the start)."""
        for key, m in list(self.metrics.items()):
            if m.spec.row == row:
                self.metrics[key] = Metric(m.spec)

    def fail_row(self, row: str, side: str, reason: str) -> None:
        """Every metric of ``row`` that ``side`` fills records ``reason``."""
        for m in self.metrics.values():
            if m.spec.row == row and side in (m.spec.evmm_side, m.spec.qemu_side):
                m.fail(side, reason)

    # ---- JSON --------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        rows = []
        for m in self.metrics.values():
            s = m.spec
            sides = {}
            for side in sorted({s.evmm_side, s.qemu_side} | set(m.samples) | set(m.failures)):
                summ = m.summary(side)
                sides[side] = {
                    "samples": m.samples.get(side, []),
                    "failures": m.failures.get(side, []),
                    "summary": None if summ is None else summ.__dict__,
                }
            rows.append(
                {
                    "key": s.key,
                    "row": s.row,
                    "title": s.title,
                    "unit": s.unit,
                    "better": s.better,
                    "qemu_side": s.qemu_side,
                    "evmm_side": s.evmm_side,
                    "note": s.note,
                    "checks": m.checks,
                    "work": m.work,
                    "notes": m.notes,
                    "sides": sides,
                    "ratio": m.ratio(),
                }
            )
        return {"schema": SCHEMA, "meta": self.meta, "metrics": rows}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"results schema {data.get('schema')!r} is not {SCHEMA}")
        res = cls(meta=dict(data.get("meta", {})))
        for row in data["metrics"]:
            spec = MetricSpec(
                key=row["key"],
                row=row["row"],
                title=row["title"],
                unit=row["unit"],
                better=row["better"],
                qemu_side=row.get("qemu_side", QEMU),
                evmm_side=row.get("evmm_side", EVMM),
                note=row.get("note", ""),
            )
            m = res.declare(spec)
            m.checks = list(row.get("checks", []))
            m.notes = list(row.get("notes", []))
            m.work = {k: [float(v) for v in vs] for k, vs in row.get("work", {}).items()}
            for side, d in row["sides"].items():
                if d["samples"]:
                    m.samples[side] = [float(v) for v in d["samples"]]
                if d["failures"]:
                    m.failures[side] = [str(f) for f in d["failures"]]
        return res

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Results:
        return cls.from_json(json.loads(path.read_text()))
