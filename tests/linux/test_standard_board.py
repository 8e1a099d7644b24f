"""The standard board (issue 18) with Debian's cloud kernel: PCI enumerated through ACPI and ECAM, virtio-pci
devices with MSI-X, and no ACPI or PCI complaint in dmesg; 1 and 2 vCPUs."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF
from evmm.netns import ip, unavailable
from evmm.netns import netns as evmm_netns
from tests.conftest import GuestFactory
from tests.linux.harness import ACPI_TROUBLE, PROMPT, READY, Guest, evmm_run_argv
from tests.linux.test_control import call, wait_for_socket

BOOT_TIMEOUT = 120.0
# Besides ACPI's: the PCI core's own words for a resource it could not place or a device it gave up on.
PCI_TROUBLE = re.compile(r"pci.*(can't|cannot|failed|error|conflict|BAR \d+: no space|not reserved)", re.I)


def standard_argv(assets: GuestAssets, cpus: int, *extra: str) -> list[str]:
    return [*evmm_run_argv(assets.vmlinux, assets.initramfs, cpus=cpus), "--machine", "standard", *extra]


def pci_devices(guest: Guest) -> dict[str, tuple[str, str, str]]:
    """/sys/bus/pci/devices as {address: (vendor, device, class)}."""
    out = guest.check(
        "for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/vendor $d/device $d/class); done"
    )
    return {a: (v, d, c) for a, v, d, c in (line.split() for line in out.splitlines() if line.strip())}


@pytest.mark.parametrize("cpus", [1, 2])
def test_boot_enumerates_the_host_bridge_and_virtio_pci_devices_with_msix(
    launch: GuestFactory, guest_assets: GuestAssets, cpus: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="evmm-std-", dir="/tmp") as d:
        disk = Path(d) / "disk.img"
        disk.write_bytes(b"evmm-standard-board" + bytes(1 << 20))
        guest = launch(
            standard_argv(guest_assets, cpus, "--rng", "--drive", f"path={disk}"), f"standard-{cpus}"
        )
        guest.expect(READY, BOOT_TIMEOUT)
        guest.expect(PROMPT, 30)
        assert guest.check("nproc").strip() == str(cpus)
        devices = pci_devices(guest)
        assert devices == {
            "0000:00:00.0": ("0x1b36", "0x0008", "0x060000"),  # the host bridge
            "0000:00:01.0": ("0x1af4", "0x1042", "0x010000"),  # virtio-blk (modern: 0x1040 + 2)
            "0000:00:02.0": ("0x1af4", "0x1044", "0xff0000"),  # virtio-rng
        }
        # MSI-X is on: each device has its vectors (config + one per queue), and /proc/interrupts names them.
        for bdf, vectors in (("0000:00:01.0", 2), ("0000:00:02.0", 2)):
            assert len(guest.check(f"ls /sys/bus/pci/devices/{bdf}/msi_irqs").split()) == vectors
        interrupts = guest.check("cat /proc/interrupts").splitlines()
        for bdf, queue in (("0000:00:01.0", "-req.0"), ("0000:00:02.0", "-input")):
            # virtio_pci's names (vp_find_vqs_msix): virtioN-config, then virtioN-<queue name> per queue, on
            # the PCI-MSI chip (Linux 6.1 names the chip, not the device: per-device MSI domains came later).
            name = guest.check(f"ls /sys/bus/pci/devices/{bdf} | grep '^virtio'").strip()
            lines = [line for line in interrupts if "PCI-MSI" in line and f" {name}-" in line]
            assert any(f"{name}-config" in line for line in lines), interrupts
            assert any(f"{name}{queue}" in line for line in lines), interrupts
        # The disk works over virtio-pci.
        assert guest.check("head -c 19 /dev/vda").strip() == "evmm-standard-board"
        assert guest.check("head -c 8 /dev/hwrng | wc -c").strip() == "8"
        log = guest.check("dmesg | grep -i -e acpi -e pci -e mmconf", timeout=60)
        trouble = [line for line in log.splitlines() if ACPI_TROUBLE.search(line) or PCI_TROUBLE.search(line)]
        assert trouble == []
        guest.sendline("poweroff")
        assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def wait_in_guest(guest: Guest, command: str, timeout: float = 60.0) -> str:
    """Run ``command`` until it succeeds (the guest's hotplug work is asynchronous); its output."""
    deadline = time.monotonic() + timeout
    while True:
        out, status = guest.run(command, timeout=30)
        if status == 0:
            return out
        assert time.monotonic() < deadline, f"{command!r} kept failing: {out}"
        time.sleep(1)


@pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")
def test_hotplug_a_disk_and_a_nic(launch: GuestFactory, guest_assets: GuestAssets) -> None:
    """ACPI PCI hotplug: a hot-added disk is read by the guest and, once ejected, gone from the guest and from
    evmm; a hot-added NIC on a tap pings the host."""
    with evmm_netns("evmm-std") as ns, tempfile.TemporaryDirectory(prefix="evmm-std-", dir="/tmp") as d:
        sock, disk = Path(d) / "api.sock", Path(d) / "hot.img"
        disk.write_bytes(b"hot-added-disk" + bytes(1 << 20))
        argv = [*("ip", "netns", "exec", ns), *standard_argv(guest_assets, 1, "--api-sock", str(sock))]
        guest = launch(argv, "standard-hotplug")
        guest.expect(READY, BOOT_TIMEOUT)
        guest.expect(PROMPT, 30)
        wait_for_socket(sock)
        assert [dev["bdf"] for dev in call(sock, "query-pci")["devices"]] == ["00:00.0"]

        assert call(sock, "device-add", kind="blk", id="hot0", path=str(disk)) == {
            "id": "hot0",
            "bdf": "00:01.0",
        }
        wait_in_guest(guest, "test -b /dev/vda")
        assert guest.check("head -c 14 /dev/vda").strip() == "hot-added-disk"
        assert "0000:00:01.0" in pci_devices(guest)
        bar = [m for m in call(sock, "query-vm")["devices"] if m["name"] == "virtio-blk-bar0"]
        assert len(bar) == 1 and bar[0]["base"] >= 1 << 32  # the guest decodes it, in the 64-bit window

        assert call(sock, "device-del", id="hot0", timeout=120) == {"id": "hot0"}
        wait_in_guest(guest, "test ! -e /dev/vda && test ! -e /sys/bus/pci/devices/0000:00:01.0")
        assert [dev["bdf"] for dev in call(sock, "query-pci")["devices"]] == ["00:00.0"]
        assert [m for m in call(sock, "query-vm")["devices"] if m["name"] == "virtio-blk-bar0"] == []

        call(sock, "device-add", kind="net", id="nic0", tap="evstd0", mac="52:54:00:12:34:57")
        ip("-n", ns, "addr", "add", "10.0.3.1/24", "dev", "evstd0")
        ip("-n", ns, "link", "set", "evstd0", "up")
        nic = wait_in_guest(guest, "ls /sys/bus/pci/devices/0000:00:01.0/virtio*/net").split()[0]
        guest.check(f"ip addr add 10.0.3.15/24 dev {nic} && ip link set {nic} up")
        out = wait_in_guest(guest, "ping -c 3 -W 5 10.0.3.1", timeout=90)
        assert "3 packets received" in out, out

        log = guest.check("dmesg | grep -i -e acpi -e pci", timeout=60)
        trouble = [line for line in log.splitlines() if ACPI_TROUBLE.search(line) or PCI_TROUBLE.search(line)]
        assert trouble == []
        guest.sendline("poweroff")
        assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
