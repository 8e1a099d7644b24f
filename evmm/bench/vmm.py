"""The two VMMs under test, configured alike: one ``VmSpec`` becomes an ``evmm run`` or a QEMU microvm argv.

Both get the same kernel, initramfs, command line, memory and vCPUs, and the same virtio-mmio devices.  QEMU
is configured as a user after speed would: KVM with ``-cpu host``, the microvm board with its RTC (Linux stalls
~10 s in rtc_cmos without one) and no option ROMs, no default devices; the disk on ``aio=threads`` with the
host page cache (the image lives in a tmpfs, where O_DIRECT and so ``cache=none``/``aio=native`` are refused,
and evmm's own I/O is buffered too); the NIC on a tap with vhost-net off (the device model in the VMM) and,
as a second side of each VMM, on (the kernel moves the packets: what a user would pick, and evmm's default).
"""

from __future__ import annotations

import sys
from pathlib import Path

from evmm.record import record

QEMU_BINARY = "qemu-system-x86_64"
QEMU_MACHINE = "microvm,rtc=on,x-option-roms=off"
MAC = "52:54:00:12:34:56"


@record(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path
    append: str
    memory_mib: int
    cpus: int = 1
    drive: Path | None = None
    tap: str | None = None
    mac: str = MAC
    api_sock: Path | None = None  # evmm's msgpack control socket
    qmp_sock: Path | None = None  # QMP (QEMU's, or evmm's --qmp)
    verbose: bool = False  # evmm -v: logs the boot-timer register's reading (a few lines in all)


@record(frozen=True)
class Side:
    """One VMM configuration: a column of the table."""

    name: str  # evmm, evmm-vhost, qemu, qemu-vhost
    vmm: str  # "evmm" or "qemu"
    vhost: bool = False  # the NIC's vhost-net, for rows with one

    @property
    def label(self) -> str:
        labels = {
            "evmm": "evmm",
            "evmm-vhost": "evmm, vhost-net",
            "qemu": "QEMU microvm",
            "qemu-vhost": "QEMU microvm, vhost-net",
        }
        return labels.get(self.name, self.name)

    def argv(self, spec: VmSpec) -> list[str]:
        return evmm_argv(spec, vhost=self.vhost) if self.vmm == "evmm" else qemu_argv(spec, vhost=self.vhost)


EVMM = Side("evmm", "evmm")
EVMM_VHOST = Side("evmm-vhost", "evmm", vhost=True)
QEMU = Side("qemu", "qemu")
QEMU_VHOST = Side("qemu-vhost", "qemu", vhost=True)


def evmm_argv(spec: VmSpec, *, vhost: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "evmm", "run"]
    argv += ["--kernel", str(spec.kernel), "--initrd", str(spec.initrd), "--append", spec.append]
    argv += ["--memory", f"{spec.memory_mib}M", "--cpus", str(spec.cpus)]
    if spec.drive is not None:
        argv += ["--drive", f"path={spec.drive},id=bench"]
    if spec.tap is not None:
        argv += ["--net", f"tap={spec.tap},mac={spec.mac},vhost={'on' if vhost else 'off'}"]
    if spec.api_sock is not None:
        argv += ["--api-sock", str(spec.api_sock)]
    if spec.qmp_sock is not None:
        argv += ["--qmp", f"unix:{spec.qmp_sock},server,nowait"]
    if spec.verbose:
        argv.append("-v")
    return argv


def qemu_argv(spec: VmSpec, *, vhost: bool = False) -> list[str]:
    argv = [QEMU_BINARY, "-M", QEMU_MACHINE, "-enable-kvm", "-cpu", "host"]
    argv += ["-smp", str(spec.cpus), "-m", f"{spec.memory_mib}M", "-no-reboot"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.append]
    if spec.drive is not None:
        argv += [
            "-drive",
            f"file={spec.drive},format=raw,if=none,id=bench,aio=threads,cache=writeback",
            "-device",
            "virtio-blk-device,drive=bench,serial=bench",
        ]
    if spec.tap is not None:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={spec.tap},script=no,downscript=no,vhost={'on' if vhost else 'off'}",
            "-device",
            f"virtio-net-device,netdev=net0,mac={spec.mac}",
        ]
    if spec.qmp_sock is not None:
        argv += ["-qmp", f"unix:{spec.qmp_sock},server=on,wait=off"]
    return argv
