"""virtio-rng in a real guest: the driver binds through ACPI, and /dev/hwrng yields data."""

from __future__ import annotations

import pytest

from evmm.assets import GuestAssets
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, evmm_run_argv

BOOT_TIMEOUT = 120.0


@pytest.mark.both_boards
def test_hwrng_yields_data(launch: GuestFactory, guest_assets: GuestAssets, board: str) -> None:
    guest = launch(
        evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, board=board) + ["--rng"], f"rng-{board}"
    )
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    assert guest.check("cat /sys/devices/virtual/misc/hw_random/rng_current").strip().startswith("virtio_rng")
    hexdump = guest.check(
        "head -c 4096 /dev/hwrng | od -An -v -tx1 | tr -s ' \\n' '\\n' | sort -u | wc -l", 60
    )
    # 4 KiB of random bytes take (nearly) all 256 values; a stuck or zero-filled device gives one.
    assert int(hexdump.split()[-1]) > 200
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == 0
