"""The default guest (``evmm assets``) boots on QEMU's microvm board, the reference VMM, on a genuine KVM.

These prove the assets independently of evmm's own VMM: the same kernel and initramfs ``evmm run`` boots.
The tools initramfs is checked on evmm (see its test).
"""

from __future__ import annotations

import re

import pytest

from evmm.assets import GuestAssets
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, evmm_run_argv, kernel_args, qemu_microvm_argv

BOOT_TIMEOUT = 90.0
MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
)


@pytest.mark.parametrize("kind", ["vmlinux", "bzimage"])
def test_default_guest_boots_on_qemu_microvm(
    launch: GuestFactory, guest_assets: GuestAssets, kind: str
) -> None:
    kernel = guest_assets.vmlinux if kind == "vmlinux" else guest_assets.bzimage
    guest = launch(qemu_microvm_argv(kernel, guest_assets.initramfs, cpus=2), f"qemu-{kind}")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    assert guest.check("nproc").strip() == "2"
    loaded = guest.check("cut -d' ' -f1 /proc/modules").split()
    assert set(MODULES) <= set(loaded)
    guest.sendline("poweroff")
    assert guest.wait_exit(30) == 0


def test_module_parameters_from_the_command_line(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    argv = qemu_microvm_argv(
        guest_assets.vmlinux, guest_assets.initramfs, append=kernel_args("virtio_net.napi_weight=32")
    )
    guest = launch(argv, "qemu-params")
    guest.expect(READY, BOOT_TIMEOUT)
    assert guest.check("cat /sys/module/virtio_net/parameters/napi_weight").strip() == "32"
    # The shell is the console's session leader with job control (cttyhack gave it a controlling tty).
    assert "job control turned off" not in guest.log
    assert guest.check("cat /proc/self/stat").split()[6] != "0"  # tty_nr: the shell has a controlling tty
    guest.sendline("exit")  # the console shell ending powers the VM off
    assert guest.wait_exit(30) == 0


def test_reboot_ends_the_vm(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    # reboot=t: microvm has no keyboard controller or ACPI reset register, so the kernel must triple-fault.
    argv = qemu_microvm_argv(guest_assets.vmlinux, guest_assets.initramfs, append=kernel_args("reboot=t"))
    guest = launch(argv, "qemu-reboot")
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    guest.sendline("reboot")
    # -no-reboot: QEMU exits when the guest resets; the guest must get there by itself.
    assert guest.wait_exit(60) == 0
    assert re.search(r"reboot: Restarting system|The system is going down", guest.log)


def test_tools_initramfs_runs_fio_iperf3_socat(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    if not guest_assets.tools_initramfs.is_file():
        pytest.skip("the tools initramfs was not built (evmm assets --no-tools)")
    # On evmm: QEMU's serial output stalled once in the KVM test host in the middle of socat -V's ~4 KB.
    argv = evmm_run_argv(guest_assets.vmlinux, guest_assets.tools_initramfs, memory="512M")
    guest = launch(argv, "evmm-tools")
    guest.expect(READY, BOOT_TIMEOUT)
    assert guest.check("fio --version").startswith("fio-")
    assert "iperf" in guest.check("iperf3 --version")
    assert "VSOCK" in guest.check("socat -V")
    guest.sendline("poweroff")
    assert guest.wait_exit(30) == 0
