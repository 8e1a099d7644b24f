"""What every benchmark row is given, and what it hands back.

A row (``boot``, ``memory``, ``blk``, ``net``, ``control``, ``density``) declares its metrics, may set up
something shared by its runs (a disk image, a network namespace), and measures one run of one side at a time;
the runner alternates the sides (A B A B) and records what each run returns or why it failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Protocol

from evmm.assets import GuestAssets
from evmm.bench.console import VmProcess
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import Side, VmSpec
from evmm.record import record

# Called with each VMM the moment it is launched (the profiler attaches to evmm this way).
Watch = Callable[[VmProcess], None]


@record
class Context:
    guest: GuestAssets
    append: str  # the kernel command line, the same on both sides
    workdir: Path  # scratch space for images and sockets (a tmpfs inside the test host)
    quick: bool
    say: Callable[[str], None]
    boot_timeout: float = 180.0  # a quiet boot takes 3-10 s in the test host; a hung one is a failed run
    machine: str = "microvm"  # the boards compared: evmm's --machine and its QEMU counterpart

    def spec(self, memory_mib: int, *, tools: bool = False) -> VmSpec:
        """The default guest (or its tools variant, with fio and iperf3) on the shared command line."""
        initrd = self.guest.tools_initramfs if tools else self.guest.initramfs
        return VmSpec(self.guest.vmlinux, initrd, self.append, memory_mib, machine=self.machine)


@record
class Measurement:
    values: dict[str, float] = field(default_factory=dict)  # metric key -> value
    work: dict[str, float] = field(default_factory=dict)  # metric key -> the work done (bytes)
    notes: dict[str, str] = field(default_factory=dict)  # metric key -> a remark for the table


class Row(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def sides(self) -> tuple[Side, ...]: ...

    def metrics(self) -> list[MetricSpec]: ...

    def setup(self, ctx: Context) -> None: ...

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement: ...

    def teardown(self, ctx: Context) -> None: ...


def launch(
    side: Side, spec: VmSpec, name: str, watch: Watch | None, prefix: list[str] | None = None
) -> VmProcess:
    vm = VmProcess([*(prefix or []), *side.argv(spec)], name)
    if watch is not None:
        watch(vm)
    return vm
