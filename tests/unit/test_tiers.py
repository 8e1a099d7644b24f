"""Which KVM each test tier uses, and how inner linux-tier results are folded back (tests/tiers.py)."""

from __future__ import annotations

from pathlib import Path

from evmm.hostkvm import HostKvm
from tests.tiers import merge_outcome, plan, tier_of

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


def test_merge_outcome_keeps_the_reruns() -> None:
    crash = {"when": "call", "outcome": "rerun", "text": "E   GuestKernelCrash: int3"}
    ok = {"when": "call", "outcome": "passed", "text": ""}
    assert merge_outcome([crash, ok]) == {"outcome": "passed", "text": "", "reruns": [crash["text"]]}
    bad = merge_outcome([crash, {**ok, "outcome": "failed", "text": "again"}])
    assert bad["outcome"] == "failed" and bad["reruns"] == [crash["text"]]
