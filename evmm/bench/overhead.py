"""Row 2: the VMM's memory overhead, peak and steady, for a 128 MiB and a 1 GiB guest.

Overhead is the process's resident memory minus the guest RAM it holds (``smaps``: the guest RAM mapping's
Rss is the guest's, all the rest the VMM's).  A sampler reads smaps every ``PERIOD`` seconds from launch until
the shell prompt has been up ``SETTLE`` seconds.  *Steady* is the median of a few samples then.  *Peak* is the
largest sampled overhead, or ``VmHWM`` minus the guest's final Rss when that is larger: guest RAM only grows
here, so that difference is a lower bound of the true peak too, and it catches spikes between samples.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from evmm.bench import smaps
from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side

SIZES_MIB = (128, 1024)
PERIOD = 0.2
SETTLE = 3.0
STEADY_SAMPLES = 5
MiB = 1 << 20


class Sampler(threading.Thread):
    """Samples a process's overhead until stopped; before the guest RAM is mapped all of it is overhead."""

    def __init__(self, pid: int, regions: list[int]) -> None:
        super().__init__(name=f"smaps-{pid}", daemon=True)
        self.pid = pid
        self.regions = regions
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()
        self.start()

    def sample(self) -> smaps.Usage | None:
        try:
            return smaps.read(self.pid, self.regions)
        except smaps.SmapsError:
            try:
                total = sum(m.rss for m in smaps.parse(Path(f"/proc/{self.pid}/smaps").read_text()))
            except OSError:
                return None
            return smaps.Usage(total, 0, 0)

    def run(self) -> None:
        while not self._done.wait(PERIOD):
            u = self.sample()
            if u is not None:
                self.peak = max(self.peak, u.overhead)
                self.samples += 1

    def stop(self) -> None:
        self._done.set()
        self.join()


class MemoryRow:
    name = "memory"
    sides = (EVMM, QEMU)

    def metrics(self) -> list[MetricSpec]:
        out = []
        for size in SIZES_MIB:
            label = f"{size} MiB guest" if size < 1024 else f"{size // 1024} GiB guest"
            out += [
                MetricSpec(f"memory.{size}.peak", "memory", f"VMM overhead, peak ({label})", "MiB", "lower"),
                MetricSpec(
                    f"memory.{size}.steady", "memory", f"VMM overhead, steady ({label})", "MiB", "lower"
                ),
                MetricSpec(
                    f"memory.{size}.guest",
                    "memory",
                    f"guest RAM touched, steady ({label})",
                    "MiB",
                    "lower",
                    note="information: the guest's own, not overhead",
                ),
            ]
        return out

    def setup(self, ctx: Context) -> None:
        pass

    def teardown(self, ctx: Context) -> None:
        pass

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        out = Measurement()
        for size in SIZES_MIB:
            with launch(side, ctx.spec(size), f"{side.name}-mem{size}", watch) as vm:
                sampler = Sampler(vm.pid, [size * MiB])
                try:
                    vm.wait_for(READY, ctx.boot_timeout)
                    vm.wait_for(PROMPT, 60)
                    time.sleep(SETTLE)
                finally:
                    sampler.stop()
                steady = []
                for _ in range(STEADY_SAMPLES):
                    steady.append(smaps.read(vm.pid, [size * MiB]))
                    time.sleep(PERIOD)
                hwm = smaps.peak_rss(vm.pid)
                last = steady[-1]
                peak = max(sampler.peak, *(u.overhead for u in steady), hwm - last.guest)
                out.values[f"memory.{size}.peak"] = peak / MiB
                out.values[f"memory.{size}.steady"] = statistics.median(u.overhead for u in steady) / MiB
                out.values[f"memory.{size}.guest"] = last.guest / MiB
                vm.sendline("poweroff")
                vm.wait_exit(120)
        return out
