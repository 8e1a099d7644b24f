"""Row 7: what the seccomp filters cost: evmm with its default ``--seccomp kill`` against ``--seccomp off``.

Two paths where the filters run most often per unit of guest work:

- the exit path: the guest loads the boot-timer register (0xFEB01000, a device that answers in place on the
  vCPU thread) ``READS`` times from a page of ``/dev/mem`` it mapped (``evmm-mmio-reads``, a static program
  of the tools initramfs; ``read()`` of /dev/mem stops at the end of RAM), so each load is an MMIO exit: one
  KVM_RUN return, one dispatch in Python and one KVM_RUN again, the vCPU's filter checking each ioctl.  The
  program times the loop with the guest's clock and prints the mean.  (The default guest has no /dev/port,
  so port I/O cannot be driven the same way.)
- the I/O path: fio's 4k random reads at queue depth 1 on virtio-blk (the blk row's image and job), each
  request a kick, an eventfd read, a preadv on a worker (two stacked filters) and an irqfd write.

The "QEMU" column is evmm with ``--seccomp off``: the ratio is the filters' cost.
"""

from __future__ import annotations

import re
from dataclasses import replace

from evmm.assets.guest import BOOT_MARKER_ADDRESS
from evmm.bench import fio
from evmm.bench.blk import BlkRow
from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, EVMM_SECCOMP_OFF, Side

READS, QUICK_READS = 20000, 5000
MMIO_READS = re.compile(r"evmm-mmio-reads: (\d+) reads, (\d+) ns each")
RANDREAD = "randread-qd1"


class SeccompBenchError(Exception):
    pass


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
        reads = QUICK_READS if ctx.quick else READS
        job = next(j for j in self.blk.jobs if j.name == RANDREAD)
        spec = replace(ctx.spec(512, tools=True), drive=self.blk.image)
        out = Measurement()
        with launch(side, spec, f"{side.name}-seccomp", watch) as vm:
            vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)

            text = vm.check(f"evmm-mmio-reads {BOOT_MARKER_ADDRESS:#x} {reads}", 900)
            m = MMIO_READS.search(text)
            if m is None or int(m.group(1)) != reads:
                raise SeccompBenchError(f"evmm-mmio-reads said {text.strip()!r}")
            out.values["seccomp.exit"] = int(m.group(2)) / 1000
            result = fio.parse(vm.check(" ".join(job.argv()), 900), job.name)
            out.values["seccomp.randread"] = result.iops
            out.work["seccomp.randread"] = result.io_bytes
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
