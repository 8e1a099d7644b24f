"""Row 7: what the seccomp filters cost: evmm with its default ``--seccomp kill`` against ``--seccomp off``.

Two paths where the filters run most often per unit of guest work:

- the exit path: the guest reads ``EXITS`` unclaimed I/O ports one byte at a time (busybox ``dd`` on
  ``/dev/port``), so each byte is one KVM_RUN return, one dispatch in Python and one KVM_RUN again, the
  vCPU's filter checking each ioctl.  Per exit: the command's time minus the same command reading 0 bytes,
  divided by ``EXITS`` (both timed on the host, from sending the line to the shell's marker);
- the I/O path: fio's 4k random reads at queue depth 1 on virtio-blk (the blk row's image and job), each
  request a kick, an eventfd read, a preadv on a worker (two stacked filters) and an irqfd write.

The "QEMU" column is evmm with ``--seccomp off``: the ratio is the filters' cost.
"""

from __future__ import annotations

import time
from dataclasses import replace

from evmm.bench import fio
from evmm.bench.blk import BlkRow
from evmm.bench.console import PROMPT, READY, VmProcess
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, EVMM_SECCOMP_OFF, Side

EXITS = 20_000
QUICK_EXITS = 5_000
FIRST_PORT = 0x1000  # from here up nothing of the microvm board answers: the bus floats high, in place
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
            MetricSpec("seccomp.exit", "seccomp", "port-I/O exit, round trip", "us", "lower", off, note),
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
        exits = QUICK_EXITS if ctx.quick else EXITS
        job = next(j for j in self.blk.jobs if j.name == RANDREAD)
        spec = replace(ctx.spec(512, tools=True), drive=self.blk.image)
        out = Measurement()
        with launch(side, spec, f"{side.name}-seccomp", watch) as vm:
            vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)
            read = f"dd if=/dev/port of=/dev/null bs=1 skip={FIRST_PORT} count="
            base = min(_timed(vm, read + "0", 60) for _ in range(3))
            full = _timed(vm, f"{read}{exits}", 600)
            out.values["seccomp.exit"] = max(0.0, full - base) / exits * 1e6
            result = fio.parse(vm.check(" ".join(job.argv()), 900), job.name)
            out.values["seccomp.randread"] = result.iops
            out.work["seccomp.randread"] = result.io_bytes
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
