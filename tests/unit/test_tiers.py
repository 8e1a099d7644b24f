"""Which KVM each test tier uses, and how inner linux-tier results are folded back (tests/tiers.py)."""

from __future__ import annotations

from pathlib import Path

from evmm.hostkvm import HostKvm
from evmm.testhost.runner import EXIT_NO_STATUS
from tests.tiers import MAX_BARREN_BOOTS, MAX_BOOTS, Boots, deal, merge_outcome, plan, tier_of

PVM = HostKvm(True, "kvm_pvm", False, "/dev/kvm is PVM-based (kvm_pvm)")
AMD = HostKvm(True, "kvm_amd", True, "/dev/kvm is hardware-backed (kvm_amd)")
NONE = HostKvm(False, "", False, "/dev/kvm does not exist")


def test_pvm_host_with_qemu_uses_the_test_host() -> None:
    p = plan(PVM, in_testhost=False, qemu="/usr/bin/qemu-system-x86_64")
    assert p.linux_mode == "testhost"
    assert p.kvm_skip is None
    assert p.kvm_header == "kvm tier: /dev/kvm kvm_pvm (ring-0 emulated)"
    assert "KVM test host (kvm_amd in QEMU TCG)" in p.linux_header


def test_hardware_kvm_and_inside_the_test_host_run_directly() -> None:
    assert plan(AMD, in_testhost=False, qemu=None).linux_mode == "direct"
    inside = plan(AMD, in_testhost=True, qemu="/usr/bin/qemu-system-x86_64")
    assert inside.linux_mode == "direct"
    assert inside.linux_header == "linux tier: /dev/kvm kvm_amd inside the KVM test host"


def test_no_way_to_boot_linux_skips_with_the_reason() -> None:
    p = plan(NONE, in_testhost=False, qemu=None)
    assert p.linux_mode == "skip" and "qemu-system-x86_64 is not installed" in p.linux_reason
    assert p.kvm_skip == "/dev/kvm does not exist"
    # Inside a test host whose KVM failed to load there is no further level to go to.
    assert plan(NONE, in_testhost=True, qemu="/usr/bin/qemu-system-x86_64").linux_mode == "skip"


def test_tier_of_paths() -> None:
    tests = Path("/r/tests")
    assert tier_of(Path("/r/tests/unit/test_x.py"), tests) == "unit"
    assert tier_of(Path("/r/tests/linux/test_boot.py"), tests) == "linux"
    assert tier_of(Path("/r/tests/fakes/x.py"), tests) is None
    assert tier_of(Path("/elsewhere/test_x.py"), tests) is None


def test_merge_outcome() -> None:
    ok = {"when": "call", "outcome": "passed", "text": ""}
    assert merge_outcome([{**ok, "when": "setup"}, ok, {**ok, "when": "teardown"}])["outcome"] == "passed"
    failed = merge_outcome([ok, {"when": "teardown", "outcome": "failed", "text": "boom"}])
    assert failed == {"outcome": "failed", "text": "[teardown] boom", "reruns": []}
    skipped = merge_outcome([{"when": "setup", "outcome": "skipped", "text": "no tools"}])
    assert skipped == {"outcome": "skipped", "text": "no tools", "reruns": []}


def test_merge_outcome_ignores_the_start_line() -> None:
    start = {"when": "start", "outcome": "started", "text": ""}
    ok = {"when": "call", "outcome": "passed", "text": ""}
    assert merge_outcome([start, ok])["outcome"] == "passed"
    failed = merge_outcome([start, {**ok, "outcome": "failed", "text": "boom"}])
    assert failed["outcome"] == "failed" and failed["text"] == "[call] boom"


def test_merge_outcome_keeps_the_reruns() -> None:
    crash = {"when": "call", "outcome": "rerun", "text": "E   GuestKernelCrash: int3"}
    ok = {"when": "call", "outcome": "passed", "text": ""}
    assert merge_outcome([crash, ok]) == {"outcome": "passed", "text": "", "reruns": [crash["text"]]}
    bad = merge_outcome([crash, {**ok, "outcome": "failed", "text": "again"}])
    assert bad["outcome"] == "failed" and bad["reruns"] == [crash["text"]]


def _done(*nodeids: str, running: str | None = None) -> dict[str, dict[str, object]]:
    """A boot's report: ``nodeids`` finished (passed), ``running`` started and never torn down."""
    done: dict[str, dict[str, object]] = {
        n: {"outcome": "passed", "text": "", "reruns": [], "complete": True} for n in nodeids
    }
    if running is not None:
        done[running] = {"outcome": "passed", "text": "", "reruns": [], "complete": False}
    return done


STALL = "the test host gave no sign of life"


def test_boots_go_on_after_lost_test_hosts_under_different_tests() -> None:
    # The CI run that lost four test hosts, each under a different test: every test must still run.
    tests = [f"t{i}" for i in range(6)]
    boots = Boots(tests)
    for i in range(4):
        assert boots.more()
        boots.after(_done(f"t{i}", running=f"t{i + 1}"), -15, STALL)
    assert boots.remaining == ["t4", "t5"] and boots.more()
    boots.after(_done("t4", "t5"), 0, None)
    assert not boots.more() and boots.remaining == []
    outcomes = boots.finish()
    assert {k: v["outcome"] for k, v in outcomes.items()} == dict.fromkeys(tests, "passed")
    # A test that passed only in a fresh test host says why the first was lost.
    assert outcomes["t1"]["reruns"] == [f"E   a fresh KVM test host ran it after the first was lost: {STALL}"]
    assert outcomes["t0"]["reruns"] == []
    assert len(boots.notes) == 4 and "while t1 ran" in boots.notes[0]


def test_a_test_under_which_two_test_hosts_are_lost_fails_and_the_rest_go_on() -> None:
    boots = Boots(["a", "b", "c"])
    boots.after(_done(running="a"), -15, STALL)
    boots.after(_done(running="a"), EXIT_NO_STATUS, None)
    assert boots.outcomes["a"]["outcome"] == "failed"
    assert "two test hosts were lost while it ran" in boots.outcomes["a"]["text"]
    assert "exited 125" in boots.outcomes["a"]["text"]
    assert boots.remaining == ["b", "c"] and boots.more()
    boots.after(_done("b", "c"), 0, None)
    assert not boots.remaining


def test_boots_stop_when_no_test_even_starts() -> None:
    boots = Boots(["a", "b"])
    for _ in range(MAX_BARREN_BOOTS):
        assert boots.more()
        boots.after({}, EXIT_NO_STATUS, None)
    assert not boots.more() and boots.remaining == ["a", "b"]
    assert boots.count == MAX_BARREN_BOOTS
    assert boots.outcomes == {}  # no test is blamed for a test host that never ran one
    assert boots.notes[0] == "boot 1: the test host exited 125 with 2 tests unreported, before a test started"


def test_boots_are_bounded_in_number() -> None:
    tests = [f"t{i}" for i in range(3 * MAX_BOOTS)]
    boots = Boots(tests)
    while boots.more():
        i = boots.count
        boots.after(_done(tests[i], running=tests[i + 1]), -15, STALL)
    assert boots.count == MAX_BOOTS and len(boots.remaining) == len(tests) - MAX_BOOTS


def test_a_run_that_ended_by_itself_with_tests_unreported_is_not_repeated() -> None:
    boots = Boots(["a", "b"])
    boots.after(_done("a"), 4, None)  # pytest's own exit status (an internal or collection error, say)
    assert not boots.more() and boots.remaining == ["b"] and boots.notes == []


def test_deal_spreads_neighbours_and_keeps_order() -> None:
    tests = [f"t{i}" for i in range(7)]
    assert deal(tests, 2) == [["t0", "t2", "t4", "t6"], ["t1", "t3", "t5"]]
    assert deal(tests, 1) == [tests]
    assert deal(["a"], 3) == [["a"]]  # no test host without tests
    assert sorted(t for part in deal(tests, 3) for t in part) == sorted(tests)


def test_deal_balances_the_seconds_with_a_costly_test() -> None:
    # The net test's 300 s against twelve ordinary ones: it gets a host nearly to itself.
    tests = [f"t{i}" for i in range(12)]
    tests.insert(5, "net")
    a, b = deal(tests, 2, {"net": 300})
    assert "net" in a and len(a) == 1 + 1 and len(b) == 11  # 300 + 30 against 330
    assert b == [t for t in tests if t in b]  # collection order kept


def test_a_linux_tests_node_id_is_the_same_in_a_whole_run_and_in_the_test_hosts_run() -> None:
    """The inner run in the test host is given the outer run's node ids; a parametrised test whose ids came
    out in another order there ("[evmm-microvm]" for "[microvm-evmm]") is not found, and a shard holding
    one ran nothing at all."""
    import subprocess
    import sys

    def ids(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *args],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        return [line for line in out.splitlines() if line.startswith("tests/linux/test_virtio_net.py::")]

    whole = ids()
    assert whole and whole == ids("tests/linux/test_virtio_net.py")
    assert ids(whole[1]) == [whole[1]]
