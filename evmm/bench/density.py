"""Row 6: density: how many small (96 MiB) microVMs run at once before a new one's boot time doubles.

96 MiB, not the 64 MiB one might pick: Debian's 6.1 cloud kernel reserves ~45 MiB of a 64 MiB guest for
itself (its "Memory:" line: 19388K/65144K available) and then dies out of memory while booting, under QEMU
microvm and evmm alike (measured in the KVM test host); at 80 MiB it boots, and 96 MiB leaves it room to idle.

VMs are started one after another, each left idle at its shell prompt before the next starts.  The first
boot (launch -> init marker on the serial line) is the baseline.  When a boot takes more than twice the
baseline and the next one does too (one slow boot on a shared machine is noise, two in a row are a trend),
the count is the number of VMs that were already running when the first of them started.  The sweep also
ends at ``limit`` VMs or when the host's available memory runs short; the count is then a lower bound, and
the row's note says so.
"""

from __future__ import annotations

import time
from pathlib import Path

from evmm.bench.console import PROMPT, READY, ConsoleError, VmProcess
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side

MEMORY_MIB = 96
# High enough that the doubling (or the host's memory) ends a sweep, not the cap: 48 was reached.  Each VM
# holds ~100 MiB, so a test host with --testhost-memory 16G runs out near 140.
LIMIT = 160
QUICK_LIMIT = 12
MiB = 1 << 20
RESERVE = 512 * MiB  # stop while the host still has this much memory available


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def count_before_doubling(boots: list[float]) -> int | None:
    """The VMs running when boot time doubled for good: two boots in a row over twice the first.

    ``boots[i]`` is the boot time of VM i+1, started with i VMs running.  None when it never doubled.
    """
    if not boots:
        return None
    limit = 2 * boots[0]
    for i in range(1, len(boots) - 1):
        if boots[i] > limit and boots[i + 1] > limit:
            return i
    return None


class DensityRow:
    name = "density"
    sides = (EVMM, QEMU)

    def metrics(self) -> list[MetricSpec]:
        return [
            MetricSpec(
                "density.count",
                "density",
                f"{MEMORY_MIB} MiB microVMs running before boot time doubles",
                "VMs",
                "higher",
            ),
            MetricSpec("density.base", "density", "density: first boot (alone)", "ms", "lower"),
            MetricSpec(
                "density.rss", "density", "density: resident memory per VM (VMM + guest)", "MiB", "lower"
            ),
        ]

    def setup(self, ctx: Context) -> None:
        pass

    def teardown(self, ctx: Context) -> None:
        pass

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        limit = QUICK_LIMIT if ctx.quick else LIMIT
        spec = ctx.spec(MEMORY_MIB)
        vms: list[VmProcess] = []
        boots: list[float] = []
        why_stopped = f"stopped at the limit of {limit} VMs"
        count: int | None = None
        try:
            while len(vms) < limit:
                if vms and mem_available() < RESERVE + 2 * max(rss(v.pid) for v in vms):
                    why_stopped = f"stopped at {len(vms)} VMs: the host's memory ran short"
                    break
                vm = launch(side, spec, f"{side.name}-density{len(vms) + 1}", watch if not vms else None)
                vms.append(vm)
                timeout = max(ctx.boot_timeout, 10 * boots[0] / 1000) if boots else ctx.boot_timeout
                try:
                    _, ready = vm.wait_for(READY, timeout)
                    vm.wait_for(PROMPT, 60)
                except ConsoleError as e:
                    if not boots:
                        raise
                    # A boot that never finished counts as a doubled one.
                    ctx.say(f"density: VM {len(vms)} did not boot: {str(e).splitlines()[0]}")
                    boots.append(float("inf"))
                else:
                    boots.append((ready - vm.launched) * 1000)
                    ctx.say(f"density: {side.name} VM {len(vms)} booted in {boots[-1]:.0f} ms")
                count = count_before_doubling(boots)
                if count is not None:
                    why_stopped = ""
                    break
            per_vm = sum(rss(v.pid) for v in vms if v.alive()) / max(1, sum(v.alive() for v in vms))
        finally:
            for v in vms:
                v.kill()
        time.sleep(2)  # let the kernel reclaim before the next sweep
        out = Measurement()
        out.values["density.count"] = count if count is not None else len(vms)
        out.values["density.base"] = boots[0]
        out.values["density.rss"] = per_vm / MiB
        if why_stopped:
            out.notes["density.count"] = f"{why_stopped}: a lower bound"
        return out
