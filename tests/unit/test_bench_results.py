"""evmm bench's results: summaries, ratios, failed sides, the same-work check, JSON round trip, the table."""

from __future__ import annotations

from pathlib import Path

from evmm.bench import report
from evmm.bench.density import count_before_doubling
from evmm.bench.results import EVMM, QEMU, MetricSpec, Results, summarize

BOOT = MetricSpec("boot.ready", "boot", "launch -> marker", "ms", "lower")
NET = MetricSpec(
    "net.g2h.vhost",
    "net",
    "TCP guest -> host",
    "Gbit/s",
    "higher",
    qemu_side="qemu-vhost",
    evmm_side="evmm-vhost",
)


def test_summary_is_median_min_max() -> None:
    s = summarize([5.0, 1.0, 3.0, 9.0])
    assert s is not None
    assert (s.n, s.median, s.min, s.max) == (4, 4.0, 1.0, 9.0)
    assert summarize([]) is None


def test_ratio_is_the_metrics_evmm_side_over_its_qemu_side() -> None:
    res = Results()
    boot, net = res.declare(BOOT), res.declare(NET)
    for v in (100, 120, 110):
        boot.add(EVMM, v)
    for v in (50, 55, 60):
        boot.add(QEMU, v)
    assert boot.ratio() == 110 / 55
    assert boot.evmm_better() is False  # lower is better, and evmm is slower
    net.add(EVMM, 2.0)
    net.add(QEMU, 1.0)  # the vhost=off sides: not this row's columns
    assert net.ratio() is None
    net.add("qemu-vhost", 4.0)
    assert net.ratio() is None
    net.add("evmm-vhost", 3.0)
    assert net.ratio() == 0.75
    assert net.evmm_better() is False  # higher is better
    assert "| 3 (n=1) | 4 (n=1) | 0.75" in report.markdown(res)  # the vhost sides fill the columns


def test_a_failed_side_keeps_its_reason() -> None:
    res = Results()
    res.declare(BOOT)
    res.declare(NET)
    res.fail_row("boot", QEMU, "exited (1) before 'ready'")
    res.fail_row("net", "qemu-vhost", "no /dev/vhost-net")
    res.fail_row("net", QEMU, "unrelated side")  # net.g2h.vhost does not use the vhost=off sides
    res.fail_row("net", EVMM, "unrelated side")
    res.fail_row("net", "evmm-vhost", "no vhost here")
    assert res["boot.ready"].why_missing(QEMU) == "failed: exited (1) before 'ready'"
    assert res["boot.ready"].why_missing(EVMM) == "not run"
    assert res["net.g2h.vhost"].failures == {
        "qemu-vhost": ["no /dev/vhost-net"],
        "evmm-vhost": ["no vhost here"],
    }
    assert res["boot.ready"].ratio() is None


def test_different_work_is_flagged_and_not_compared() -> None:
    res = Results()
    m = res.declare(MetricSpec("blk.seqread", "blk", "seq read", "MB/s", "higher"))
    m.add(EVMM, 100)
    m.add(QEMU, 200)
    for side in (EVMM, QEMU):
        m.add_work(side, 256 << 20)
    assert m.check_work() == []
    m.add_work(QEMU, 128 << 20)
    assert m.check_work() and "different work" in m.check_work()[0]
    assert report.ratio_text(m) == "not comparable"


def test_json_round_trip(tmp_path: Path) -> None:
    res = Results(meta={"date": "2026-11-26", "host": {"cpus": 2, "in_testhost": True}})
    m = res.declare(BOOT)
    m.add(EVMM, 1.5)
    m.add(QEMU, 1.0)
    m.add_work(EVMM, 7)
    m.note(EVMM, "capped")
    res.declare(NET).fail("evmm-vhost", "boom")
    res.save(tmp_path / "r.json")
    back = Results.load(tmp_path / "r.json")
    assert back.meta == res.meta
    assert back["boot.ready"].samples == {EVMM: [1.5], QEMU: [1.0]}
    assert back["boot.ready"].work == {EVMM: [7.0]}
    assert back["boot.ready"].notes == ["evmm: capped"]
    assert back["net.g2h.vhost"].failures == {"evmm-vhost": ["boom"]}
    assert back["net.g2h.vhost"].spec == NET


def test_every_metric_is_a_table_row_even_without_numbers() -> None:
    res = Results(meta={"date": "d", "host": {}})
    res.declare(BOOT).add(EVMM, 3)
    res.declare(NET).fail("evmm-vhost", "tap refused")
    md = report.markdown(res)
    assert md.count("\n") == 4  # header, rule, two rows
    assert "failed: tap refused" in md
    assert "not run" in md


def test_density_count_needs_two_doubled_boots_in_a_row() -> None:
    assert count_before_doubling([10, 12, 25, 13, 15, 21, 22]) == 5
    assert count_before_doubling([10, 11, 12]) is None
    assert count_before_doubling([10, 30, float("inf")]) == 1
    assert count_before_doubling([]) is None


def test_clearing_a_row_keeps_the_others_and_the_metrics(tmp_path: Path) -> None:
    res = Results()
    boot = res.declare(MetricSpec("boot.ready", "boot", "launch -> ready", "ms", "lower"))
    blk = res.declare(MetricSpec("blk.seqread", "blk", "seq read", "MB/s", "higher"))
    boot.add(EVMM, 7000.0)
    blk.add(EVMM, 170.0)
    blk.fail(QEMU, "the test host was lost")
    res.save(tmp_path / "r.json")
    again = Results.load(tmp_path / "r.json")
    again.clear_row("blk")
    assert again["boot.ready"].samples == {EVMM: [7000.0]}
    assert again["blk.seqread"].samples == {} and again["blk.seqread"].failures == {}
    assert again["blk.seqread"].spec == blk.spec
