"""Row 7: what the seccomp filters cost: evmm with its default ``--seccomp kill`` against ``--seccomp off``.

Two paths where the filters run most often per unit of guest work:

- the exit path: the guest reads the boot-timer register page (``/dev/mem`` at 0xFEB01000, a device that
  answers in place on the vCPU thread) four bytes at a time with busybox ``dd``, ``PASSES`` times a page,
  so each read is an MMIO exit: one KVM_RUN return, one dispatch in Python and one KVM_RUN again, the
  vCPU's filter checking each ioctl.  Per exit: the loop's time minus the same loop reading nothing,
  divided by the reads (both timed on the host, from sending the line to the shell's marker).  (The
  default guest has no /dev/port, so port I/O cannot be driven the same way.)
- the I/O path: fio's 4k random reads at queue depth 1 on virtio-blk (the blk row's image and job), each
  request a kick, an eventfd read, a preadv on a worker (two stacked filters) and an irqfd write.

The "QEMU" column is evmm with ``--seccomp off``: the ratio is the filters' cost.
"""

from __future__ import annotations

import time
from dataclasses import replace

from evmm.assets.guest import BOOT_MARKER_ADDRESS
from evmm.bench import fio
from evmm.bench.blk import BlkRow
from evmm.bench.console import PROMPT, READY, VmProcess
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, EVMM_SECCOMP_OFF, Side

PAGE_READS = (
    1000  # 4-byte reads within the register page (1024 failed in a guest, 1000 reads were checked by hand)
)
PASSES = 20
QUICK_PASSES = 5
RANDREAD = "randread-qd1"


def _timed(vm: VmProcess, command: str, timeout: float) -> float:
    t = time.monotonic()
    vm.check(command, timeout)
    return time.monotonic() - t


class SeccompRow:
    name = "seccomp"
    sides = (EVMM, EVMM_SECCOMP_OFF)

    def __init__(self) -> None:
        self.blk = BlkRow()

    def metrics(self) -> list[MetricSpec]:
        off = EVMM_SECCOMP_OFF.name
        note = "'QEMU' column: evmm --seccomp off"
        return [
            MetricSpec(
                "seccomp.exit",
                "seccomp",
                "MMIO exit served on the vCPU, round trip",
                "us",
                "lower",
                off,
                note,
            ),
            MetricSpec(
                "seccomp.randread", "seccomp", "virtio-blk 4k random read, QD1", "IOPS", "higher", off, note
            ),
        ]

    def setup(self, ctx: Context) -> None:
        self.blk.setup(ctx)

    def teardown(self, ctx: Context) -> None:
        self.blk.teardown(ctx)

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        assert self.blk.image is not None, "setup() first"
        passes = QUICK_PASSES if ctx.quick else PASSES
        job = next(j for j in self.blk.jobs if j.name == RANDREAD)
        spec = replace(ctx.spec(512, tools=True), drive=self.blk.image)
        out = Measurement()
        with launch(side, spec, f"{side.name}-seccomp", watch) as vm:
            vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)

            def loop(count: int) -> str:
                dd = f"dd if=/dev/mem of=/dev/null bs=4 count={count} skip={BOOT_MARKER_ADDRESS // 4} 2>/dev/null"
                return f"for i in $(seq {passes}); do {dd}; done"

            base = min(_timed(vm, loop(0), 120) for _ in range(3))
            full = _timed(vm, loop(PAGE_READS), 900)
            out.values["seccomp.exit"] = max(0.0, full - base) / (passes * PAGE_READS) * 1e6
            result = fio.parse(vm.check(" ".join(job.argv()), 900), job.name)
            out.values["seccomp.randread"] = result.iops
            out.work["seccomp.randread"] = result.io_bytes
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
