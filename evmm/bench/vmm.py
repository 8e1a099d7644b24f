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
# evmm's board -> QEMU's: microvm against microvm, the standard board against q35 (PCIe, virtio-pci; QEMU
# runs its firmware, SeaBIOS, before the kernel it is given).  microvm keeps its option ROMs: QEMU starts a
# -kernel it was given through one (pvh.bin for an ELF vmlinux, linuxboot_dma.bin for a bzImage), and with
# x-option-roms=off QEMU 10.0 never starts the kernel (no console output at all; measured under TCG here and
# in the KVM test host, where every QEMU run of the restore and exec rows timed out).
QEMU_MACHINES = {"microvm": "microvm,rtc=on", "standard": "q35"}
# The virtio transport of each QEMU board, as a -device suffix.
QEMU_TRANSPORTS = {"microvm": "device", "standard": "pci"}
MAC = "52:54:00:12:34:56"


@record(frozen=True)
class VmSpec:
    kernel: Path
    initrd: Path
    append: str
    memory_mib: int
    cpus: int = 1
    drive: Path | None = None
    share: Path | None = None  # a shared directory: evmm's virtio-fs, QEMU's virtio-9p (tag "bench")
    tap: str | None = None
    mac: str = MAC
    api_sock: Path | None = None  # evmm's msgpack control socket
    qmp_sock: Path | None = None  # QMP (QEMU's, or evmm's --qmp)
    verbose: bool = False  # evmm -v: logs the boot-timer register's reading (a few lines in all)
    machine: str = "microvm"  # evmm's board (--machine), and the QEMU board it is compared with


@record(frozen=True)
class Side:
    """One VMM configuration: a column of the table."""

    name: str  # evmm, evmm-vhost, qemu, qemu-vhost, qemu-9p, evmm-seccomp-off
    vmm: str  # "evmm" or "qemu"
    vhost: bool = False  # the NIC's vhost-net, for rows with one
    seccomp: str = "kill"  # evmm's --seccomp

    @property
    def label(self) -> str:
        return {
            "evmm": "evmm",
            "evmm-vhost": "evmm, vhost-net",
            "qemu": "QEMU microvm",
            "qemu-vhost": "QEMU microvm, vhost-net",
            "qemu-9p": "QEMU microvm, virtio-9p",
            "evmm-seccomp-off": "evmm --seccomp off",
        }.get(self.name, self.name)

    def argv(self, spec: VmSpec) -> list[str]:
        if self.vmm != "evmm":
            return qemu_argv(spec, vhost=self.vhost)
        argv = evmm_argv(spec, vhost=self.vhost)
        return argv if self.seccomp == "kill" else [*argv, "--seccomp", self.seccomp]


EVMM = Side("evmm", "evmm")
EVMM_VHOST = Side("evmm-vhost", "evmm", vhost=True)
QEMU = Side("qemu", "qemu")
QEMU_VHOST = Side("qemu-vhost", "qemu", vhost=True)
QEMU_9P = Side("qemu-9p", "qemu")
SHARE_TAG = "bench"
EVMM_SECCOMP_OFF = Side("evmm-seccomp-off", "evmm", seccomp="off")  # the seccomp row's reference


def evmm_argv(spec: VmSpec, *, vhost: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "evmm", "run"]
    argv += ["--kernel", str(spec.kernel), "--initrd", str(spec.initrd), "--append", spec.append]
    argv += ["--memory", f"{spec.memory_mib}M", "--cpus", str(spec.cpus), "--machine", spec.machine]
    if spec.drive is not None:
        argv += ["--drive", f"path={spec.drive},id=bench"]
    if spec.tap is not None:
        argv += ["--net", f"tap={spec.tap},mac={spec.mac},vhost={'on' if vhost else 'off'}"]
    if spec.share is not None:
        # cache=none: every read and write reaches evmm, as every one reaches QEMU's 9p server (cache=none).
        argv += ["--fs", f"path={spec.share},tag={SHARE_TAG},cache=none"]
    if spec.api_sock is not None:
        argv += ["--api-sock", str(spec.api_sock)]
    if spec.qmp_sock is not None:
        argv += ["--qmp", f"unix:{spec.qmp_sock},server,nowait"]
    if spec.verbose:
        argv.append("-v")
    return argv


def qemu_argv(spec: VmSpec, *, vhost: bool = False) -> list[str]:
    argv = [QEMU_BINARY, "-M", QEMU_MACHINES[spec.machine], "-enable-kvm", "-cpu", "host"]
    transport = QEMU_TRANSPORTS[spec.machine]
    argv += ["-smp", str(spec.cpus), "-m", f"{spec.memory_mib}M", "-no-reboot"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]
    argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", spec.append]
    if spec.drive is not None:
        argv += [
            "-drive",
            f"file={spec.drive},format=raw,if=none,id=bench,aio=threads,cache=writeback",
            "-device",
            f"virtio-blk-{transport},drive=bench,serial=bench",
        ]
    if spec.tap is not None:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={spec.tap},script=no,downscript=no,vhost={'on' if vhost else 'off'}",
            "-device",
            f"virtio-net-{transport},netdev=net0,mac={spec.mac}",
        ]
    if spec.share is not None:
        # -fsdev and -device rather than -virtfs, which always adds a PCI device: on either board's transport.
        argv += [
            "-fsdev",
            f"local,id=share,path={spec.share},security_model=passthrough",
            "-device",
            f"virtio-9p-{transport},fsdev=share,mount_tag={SHARE_TAG}",
        ]
    if spec.qmp_sock is not None:
        argv += ["-qmp", f"unix:{spec.qmp_sock},server=on,wait=off"]
    return argv
