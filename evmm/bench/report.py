"""The results as a rich table, a Markdown table (docs/performance.md) and a PNG chart of the ratios.

Every declared metric is a row, whatever happened to it: a side that failed shows its reason, a row whose
sides did different work says so, and the ratio is left out rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from evmm.bench.results import Metric, Results

DASH = "\u2013"
TIMES = "\u00d7"
ROW_TITLES = {
    "boot": "1. boot",
    "memory": "2. memory overhead",
    "blk": "3. virtio-blk (fio)",
    "net": "4. virtio-net (iperf3)",
    "control": "5. control latency",
    "density": "6. density",
    "fs": "7. shared directory (virtio-fs vs virtio-9p)",
    "restore": "8. snapshot and restore",
    "exec": "9. running programs (guest agent)",
    "container": "10. containers (through podman)",
    "seccomp": "11. seccomp filters (on vs off)",
}


def fmt(v: float) -> str:
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def cell(m: Metric, side: str) -> str:
    s = m.summary(side)
    if s is None:
        if not m.failures.get(side) and m.spec.note:
            return f"n/a ({m.spec.note})"
        return m.why_missing(side)
    if s.n == 1:
        return f"{fmt(s.median)} (n=1)"
    return f"{fmt(s.median)} [{fmt(s.min)}{DASH}{fmt(s.max)}]"


def ratio_text(m: Metric) -> str:
    if m.checks:
        return "not comparable"
    r = m.ratio()
    return DASH if r is None else f"{r:.2f}{TIMES}"


def remarks(m: Metric) -> str:
    parts = list(m.checks) + list(m.notes)
    if m.spec.note and (m.summary(m.spec.evmm_side) is not None and m.summary(m.spec.qemu_side) is not None):
        parts.append(m.spec.note)
    partial = [
        f"{side}: {len(m.failures[side])} run(s) failed"
        for side in (m.spec.evmm_side, m.spec.qemu_side)
        if m.failures.get(side) and m.summary(side) is not None
    ]
    return "; ".join(parts + partial)


def _qemu(meta: dict[str, Any]) -> str:
    """Which QEMU board the run compared against (the standard board's counterpart is q35)."""
    return "QEMU q35" if meta.get("machine") == "standard" else "QEMU microvm"


def _title(m: Metric) -> str:
    return f"{m.spec.title} ({m.spec.unit}, {m.spec.better} is better)"


def rich_table(results: Results) -> Table:
    meta = results.meta
    host = meta.get("host", {})
    where = "inside the KVM test host (QEMU TCG)" if host.get("in_testhost") else "directly"
    table = Table(
        title=f"evmm {meta.get('machine', 'microvm')} vs {_qemu(meta)} — {meta.get('date', '?')}, {where}, "
        f"{host.get('cpus', '?')} CPUs",
        caption=escape(f"median [min{DASH}max] over the runs; ratio = evmm median / QEMU median"),
        show_lines=False,
    )
    table.add_column("metric")
    table.add_column("evmm", justify="right")
    table.add_column("QEMU", justify="right")
    table.add_column("evmm/QEMU", justify="right")
    table.add_column("remarks")
    current = None
    for m in results.metrics.values():
        if m.spec.row != current:
            if current is not None:
                table.add_section()
            current = m.spec.row
            table.add_row(Text(ROW_TITLES.get(current, current), style="bold"))
        better = m.evmm_better()
        style = "" if better is None or m.checks else ("green" if better else "red")
        qemu = cell(m, m.spec.qemu_side)
        table.add_row(
            escape(_title(m)),
            escape(cell(m, m.spec.evmm_side)),
            escape(qemu),
            Text(ratio_text(m), style=style),
            escape(remarks(m)),
        )
    return table


def print_table(results: Results, console: Console | None = None) -> None:
    (console or Console(width=200)).print(rich_table(results))


def markdown(results: Results) -> str:
    lines = [
        f"| metric | unit | evmm | {_qemu(results.meta)} | evmm/QEMU | remarks |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for m in results.metrics.values():
        title = f"{ROW_TITLES.get(m.spec.row, m.spec.row).split(' ', 1)[1]}: {m.spec.title}"
        better = "lower" if m.spec.better == "lower" else "higher"
        cells = [
            title,
            f"{m.spec.unit} ({better} is better)",
            cell(m, m.spec.evmm_side),
            cell(m, m.spec.qemu_side),
            ratio_text(m),
            remarks(m),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _colour(m: Metric, ratio: float) -> str:
    if 1 / 1.03 <= ratio <= 1.03:
        return "#8c8c8c"
    return "#2a9d4b" if m.evmm_better() else "#c8423a"


def chart(results: Results, path: Path) -> str | None:
    """Draw the ratios to ``path`` (PNG); None when done, else why not (no matplotlib, no ratios)."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]
        import matplotlib.ticker  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or evmm[bench])"
    rows: list[tuple[Metric, float]] = []
    for m in results.metrics.values():
        r = m.ratio()
        if r is not None and r > 0 and not m.checks:
            rows.append((m, r))
    if not rows:
        return "no metric has a ratio to draw"
    rows.reverse()  # the first metric on top
    labels = [f"{m.spec.title} ({m.spec.unit}, {m.spec.better} better)" for m, _ in rows]
    ratios = [r for _, r in rows]
    colours = [_colour(m, r) for m, r in rows]
    fig, ax = plt.subplots(figsize=(12, 0.38 * len(rows) + 1.6))
    # Bars grow from 1 (parity) towards the ratio, on a log scale: 2x and 1/2x are the same length.
    ax.barh(range(len(rows)), [r - 1 for r in ratios], left=1.0, color=colours)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}{TIMES}"))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}{TIMES}", va="center", ha="left" if r >= 1 else "right", fontsize=7)
    host = results.meta.get("host", {})
    where = "in the KVM test host (nested, QEMU TCG)" if host.get("in_testhost") else "directly on KVM"
    ax.set_title(
        f"evmm / {_qemu(results.meta)}, median ratio per metric — {results.meta.get('date', '?')[:10]}, {where}\n"
        "green: evmm better, red: evmm worse (each metric's own direction), grey: within 3%",
        fontsize=9,
    )
    ax.set_xlabel("evmm / QEMU (log scale)")
    lo, hi = min(ratios), max(ratios)
    ax.set_xlim(min(lo / 1.6, 0.5), max(hi * 1.6, 2.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
