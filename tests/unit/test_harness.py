"""The linux tier's console harness, against a stand-in VMM (a shell printing what a guest would)."""

from __future__ import annotations

import time

import pytest

from tests.linux.harness import CRASH_GRACE, READY, Guest, GuestExited, GuestKernelCrash, GuestTimeout

OOPS = (
    r"[    0.485345] int3: 0000 [#1] PREEMPT SMP NOPTI\n[    0.485345] RIP: 0010:__kprobes_text_end+0x2f559"
)


def vmm(script: str) -> Guest:
    return Guest(["sh", "-c", script], "fake-vmm")


def test_a_kernel_crash_before_ready_is_reported_as_such_and_soon() -> None:
    with vmm(f"printf '[    0.1] Linux version\\n{OOPS}\\n'; sleep 60") as guest:
        started = time.monotonic()
        with pytest.raises(GuestKernelCrash, match="crashed before"):
            guest.expect(READY, timeout=50)
        assert time.monotonic() - started < CRASH_GRACE + 3


def test_a_crash_that_ends_the_vmm_is_a_crash_too() -> None:
    script = f"printf '{OOPS}\\n[    0.5] Kernel panic - not syncing: Fatal exception\\n'"
    with vmm(script) as guest, pytest.raises(GuestKernelCrash, match="exited"):
        guest.expect(READY, timeout=30)


def test_a_crash_after_ready_is_not_a_boot_crash() -> None:
    with vmm(f"printf '{READY}\\n{OOPS}\\n'; sleep 60") as guest:
        guest.expect(READY, timeout=10)
        with pytest.raises(GuestTimeout) as e:
            guest.expect("never printed", timeout=1)
        assert not isinstance(e.value, GuestKernelCrash)


def test_a_quiet_hang_is_a_timeout() -> None:
    with vmm("printf '[    0.1] Linux version\\n'; sleep 60") as guest:
        with pytest.raises(GuestTimeout) as e:
            guest.expect(READY, timeout=1)
        assert not isinstance(e.value, GuestKernelCrash)


def test_a_triple_fault_is_a_guest_crash_before_ready_and_after() -> None:
    script = "printf 'evmm: vCPU 0 shut down (triple fault): the guest crashed\\n'; exit 4"
    with vmm(script) as guest, pytest.raises(GuestKernelCrash, match=r"exited \(4\)"):
        guest.expect(READY, timeout=30)
    with vmm(f"printf '{READY}\\n'; exit 4") as guest:
        guest.expect(READY, timeout=10)
        with pytest.raises(GuestKernelCrash):
            guest.expect("never printed", timeout=10)
    with vmm("exit 1") as guest, pytest.raises(GuestExited) as e:
        guest.expect(READY, timeout=10)
    assert not isinstance(e.value, GuestKernelCrash)


def test_qemu_exiting_0_without_the_kernels_reboot_line_is_a_guest_crash() -> None:
    # sh -c SCRIPT NAME ARGS: the stand-in's argv is QEMU's as far as the harness can tell.
    qemu = ("qemu-system-x86_64", "-no-reboot")
    crash = Guest(["sh", "-c", f"printf '{READY}\\n'; exit 0", *qemu], "fake-qemu")
    with crash as guest:
        guest.expect(READY, timeout=10)
        with pytest.raises(GuestKernelCrash, match=r"exited \(0\)"):
            guest.expect("never printed", timeout=10)
    # A deliberate power-off says so first: the VMM exiting is then just an exit.
    poweroff = Guest(["sh", "-c", "printf '[    9.1] reboot: Power down\\n'; exit 0", *qemu], "fake-qemu")
    with poweroff as guest, pytest.raises(GuestExited) as e:
        guest.expect("never printed", timeout=10)
    assert not isinstance(e.value, GuestKernelCrash)
    # evmm's exit 0 is a clean power-off whatever the console said (its crash is exit 4).
    with vmm("exit 0") as guest, pytest.raises(GuestExited) as e:
        guest.expect(READY, timeout=10)
    assert not isinstance(e.value, GuestKernelCrash)


def test_a_guest_that_dies_on_the_way_out_is_a_crash_not_an_exit_status() -> None:
    # evmm's triple fault while the test waits for the exit (seen: a 2-vCPU guest as `poweroff` was typed).
    with vmm(f"printf '{READY}\\n'; exit 4") as guest:
        guest.expect(READY, timeout=10)
        with pytest.raises(GuestKernelCrash, match=r"exited \(4\)"):
            guest.wait_exit(10)
    qemu = ("qemu-system-x86_64", "-no-reboot")
    crash = Guest(["sh", "-c", f"printf '{READY}\\n'; exit 0", *qemu], "fake-qemu")
    with crash as guest, pytest.raises(GuestKernelCrash, match=r"exited \(0\)"):
        guest.wait_exit(10)
    # Deliberate ends are exit statuses: evmm's 0 and 3, QEMU's 0 after the kernel's "reboot:" line.
    for code in (0, 3):
        with vmm(f"exit {code}") as guest:
            assert guest.wait_exit(10) == code
    with Guest(["sh", "-c", "printf '[    9.1] reboot: Power down\\n'; exit 0", *qemu], "fake-qemu") as guest:
        assert guest.wait_exit(10) == 0
