"""``evmm run`` boots Debian's cloud kernel + evmm's initramfs to a shell (issue 2, "Done means").

Both image kinds (the bzImage as Debian ships it, and the ELF vmlinux extracted from it) with 1 and 2 vCPUs:
the guest's ready line, ``nproc``, a command through the console, ``poweroff`` -> exit 0, ``reboot`` -> the
documented reset code, and a dmesg free of ACPI complaints about evmm's tables.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF, EXIT_GUEST_RESET
from tests.conftest import GuestFactory
from tests.linux.harness import ACPI_TROUBLE, PROMPT, READY, evmm_run_argv, image, kernel_args

BOOT_TIMEOUT = 120.0  # nested KVM under TCG on two shared cores; a healthy boot takes 5-20 s
EXIT_TIMEOUT = 60.0


@pytest.mark.parametrize("cpus", [1, 2])
@pytest.mark.parametrize("kind", ["bzimage", "vmlinux"])
def test_boot_to_shell_and_poweroff(
    launch: GuestFactory, guest_assets: GuestAssets, kind: str, cpus: int
) -> None:
    guest = launch(
        evmm_run_argv(image(guest_assets, kind), guest_assets.initramfs, cpus=cpus), f"evmm-{kind}-{cpus}"
    )
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    assert guest.check("nproc").strip() == str(cpus)
    output, status = guest.run("echo $((6 * 7)); false")
    assert (output.strip(), status) == ("42", 1)
    guest.sendline("poweroff")
    assert guest.wait_exit(EXIT_TIMEOUT) == EXIT_GUEST_POWEROFF


def test_reboot_ends_the_vm(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    guest = launch(evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs), "evmm-reboot")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    guest.sendline("reboot")
    assert guest.wait_exit(EXIT_TIMEOUT) == EXIT_GUEST_RESET


def test_dmesg_has_no_acpi_complaints(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    guest = launch(evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, cpus=2), "evmm-dmesg")
    guest.expect(READY, BOOT_TIMEOUT)
    # Filtered in the guest: every console byte is a VM exit, and the whole dmesg is tens of kilobytes.
    # grep fails on no match, so `check` also proves the kernel did read evmm's tables (no vacuous pass).
    acpi = guest.check("dmesg | grep -i -e acpi -e firmware", timeout=60)
    complaints = [line for line in acpi.splitlines() if ACPI_TROUBLE.search(line)]
    assert complaints == []
    guest.sendline("poweroff")
    assert guest.wait_exit(EXIT_TIMEOUT) == EXIT_GUEST_POWEROFF


def test_a_verbose_console_boot_arrives_whole(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    """Without ``quiet`` the kernel prints ~17 KB through the 16550A, nearly all of it answered by the UART
    fast path in C (evmm/devices/legacy/serial_fast.py): every line must arrive, in order, on the serial console."""
    append = " ".join(w for w in kernel_args().split() if w != "quiet")
    guest = launch(evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, append=append), "evmm-verbose")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    log = guest.log
    lines = [ln for ln in log.splitlines() if ln.startswith("[")]
    assert len(lines) > 150, log[-2000:]
    assert "Linux version" in lines[0]
    assert re.search(rf"Kernel command line: .*{re.escape(append)}", log)  # the defaults, then ours
    stamps = [float(ln[1 : ln.index("]")]) for ln in lines if "]" in ln]
    assert stamps == sorted(stamps)  # no line lost its place
    # The guest's own record agrees: every message the kernel logged at a level its console prints (below
    # the console loglevel, the first field of /proc/sys/kernel/printk), up to init's start, reached the
    # console once and in order.  The guest sends back their count and digest, not the 17 KB again.
    shown = []
    for ln in lines:
        shown.append(ln.rstrip())
        if "Run /init as init process" in ln:
            break
    assert len(shown) > 150 and shown[-1].endswith("Run /init as init process")
    console_level = (
        r"match($0, /^<[0-9]+>/) { if (substr($0, 2, RLENGTH - 2) % 8 < lvl) "
        r'{ line = substr($0, RLENGTH + 1); sub(/[ \t]+$/, "", line); print line } } '
        r"/Run \/init as init process/ { exit }"
    )
    logged = guest.check(
        f"x=$(dmesg -r | awk -v lvl=$(cut -f1 /proc/sys/kernel/printk) '{console_level}'); "
        'echo "$x" | wc -l; echo "$x" | md5sum'
    ).split()
    digest = hashlib.md5(("\n".join(shown) + "\n").encode()).hexdigest()
    assert (int(logged[0]), logged[1]) == (len(shown), digest)
    guest.sendline("poweroff")
    assert guest.wait_exit(EXIT_TIMEOUT) == EXIT_GUEST_POWEROFF
