"""What a user asks for: a machine description, parsed and validated before anything touches KVM."""

from __future__ import annotations

import re
from dataclasses import field
from pathlib import Path

from evmm.arch.x86 import layout
from evmm.config.devspec import ConsoleSpec, DriveSpec, FsSpec, NetSpec, RngSpec, VsockSpec
from evmm.errors import ConfigError
from evmm.record import record

MIN_MEMORY = 32 * layout.MiB
MAX_MEMORY = 1 << 40

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SCALE = {"": layout.MiB, "K": layout.KiB, "M": layout.MiB, "G": layout.GiB, "T": 1 << 40}


def parse_size(text: str, what: str = "--memory") -> int:
    """``256M``, ``1G``, ``512MiB``, or a bare number of MiB (as QEMU's ``-m``)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"{what} {text!r} is not a size (examples: 256M, 1G)")
    return int(m.group(1)) * _SCALE[m.group(2).upper()]


def check_memory(size: int, what: str = "--memory") -> int:
    if size < MIN_MEMORY:
        raise ConfigError(
            f"{what} {size >> 20}M is too small: a Linux guest needs at least {MIN_MEMORY >> 20}M"
        )
    if size > MAX_MEMORY:
        raise ConfigError(f"{what} {size >> 30}G is more than evmm supports ({MAX_MEMORY >> 30}G)")
    if size % (2 * layout.MiB):
        raise ConfigError(f"{what} must be a multiple of 2M (got {size} bytes)")
    return size


def check_cpus(n: int, host_max: int | None = None) -> int:
    limit = min(layout.MAX_VCPUS, host_max or layout.MAX_VCPUS)
    if not 1 <= n <= limit:
        raise ConfigError(f"--cpus {n} is out of range: 1 to {limit}")
    return n


def check_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{what} {path}: not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    return path


@record(frozen=True)
class MachineConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    memory: int = 256 * layout.MiB
    cpus: int = 1
    board: str = "microvm"
    serial: str = "stdio"  # "stdio" (the terminal, or pipes) or "none"
    drives: tuple[DriveSpec, ...] = ()
    nets: tuple[NetSpec, ...] = ()
    vsock: VsockSpec | None = None
    console: ConsoleSpec | None = None
    rng: RngSpec | None = None
    fss: tuple[FsSpec, ...] = ()  # shared directories (virtio-fs)
    # Also announce virtio-mmio devices as virtio_mmio.device= words, for kernels built with
    # VIRTIO_MMIO_CMDLINE_DEVICES; on by default only when the user turned ACPI off.
    virtio_cmdline: bool | None = None
    # Empty hot-replace slots the board reserves at boot (StratoVirt's microvm hot-replace): each is a real
    # virtio-mmio device in the DSDT whose backend the control channel fills or empties while the guest runs.
    hotplug_blk: int = 0
    hotplug_net: int = 0
    hotplug_vhost: bool | None = None  # NIC slots on vhost-net; None: where /dev/vhost-net opens
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def virtio_count(self) -> int:
        return (
            len(self.drives)
            + len(self.nets)
            + len(self.fss)
            + sum(x is not None for x in (self.vsock, self.console, self.rng))
        )
