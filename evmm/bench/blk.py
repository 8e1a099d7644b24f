"""Row 3: virtio-blk, fio in the guest against a raw image: sequential MB/s and 4k random read IOPS.

One image, filled with incompressible data once, serves every run of both VMMs; it lives in the scratch
directory (a tmpfs inside the test host), so both read the host's page cache and neither waits on a disk.
Each run boots the tools guest with the image as ``/dev/vda`` and runs the four fio jobs of ``fio.jobs`` one
after another; each job's ``io_bytes`` is kept so the runner can check that both sides did the same work.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from evmm.bench import fio
from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import Better, MetricSpec
from evmm.bench.vmm import EVMM, QEMU, Side

MiB = 1 << 20
MEMORY_MIB = 512  # the tools initramfs unpacks to ~120 MiB
IMAGE_MIB = 256
QUICK_IMAGE_MIB = 128
JOB_TIMEOUT = 900.0

_UNITS: dict[str, tuple[str, Better]] = {
    "read": ("MB/s", "higher"),
    "write": ("MB/s", "higher"),
    "randread": ("IOPS", "higher"),
}


def metric_key(job: fio.FioJob) -> str:
    return f"blk.{job.name}"


class BlkRow:
    name = "blk"
    sides = (EVMM, QEMU)

    def __init__(self) -> None:
        self.image: Path | None = None
        self.jobs: list[fio.FioJob] = []

    def metrics(self) -> list[MetricSpec]:
        titles = {
            "seqread": "virtio-blk sequential read, 1 MiB, QD8",
            "seqwrite": "virtio-blk sequential write, 1 MiB, QD8",
            "randread-qd1": "virtio-blk 4k random read, QD1",
            "randread-qd32": "virtio-blk 4k random read, QD32",
        }
        out = []
        for job in fio.jobs(IMAGE_MIB * MiB, quick=False):
            unit, better = _UNITS[job.rw]
            out.append(MetricSpec(metric_key(job), "blk", titles[job.name], unit, better))
        return out

    def setup(self, ctx: Context) -> None:
        size = (QUICK_IMAGE_MIB if ctx.quick else IMAGE_MIB) * MiB
        self.jobs = fio.jobs(size, ctx.quick)
        self.image = ctx.workdir / "bench-disk.raw"
        chunk = os.urandom(MiB)
        with open(self.image, "wb") as f:
            for i in range(size // MiB):
                # Each MiB differs (no dedup or compression anywhere could shortcut the reads).
                f.write(i.to_bytes(8, "little") + chunk[8:])
        ctx.say(f"blk: a {size // MiB} MiB raw image at {self.image}")

    def teardown(self, ctx: Context) -> None:
        if self.image is not None:
            self.image.unlink(missing_ok=True)

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        assert self.image is not None, "setup() first"
        spec = replace(ctx.spec(MEMORY_MIB, tools=True), drive=self.image)
        out = Measurement()
        with launch(side, spec, f"{side.name}-blk", watch) as vm:
            vm.wait_for(READY, ctx.boot_timeout)
            vm.wait_for(PROMPT, 60)
            for job in self.jobs:
                text = vm.check(" ".join(job.argv()), JOB_TIMEOUT)
                result = fio.parse(text, job.name)
                value = result.iops if job.rw == "randread" else result.mb_s
                out.values[metric_key(job)] = value
                out.work[metric_key(job)] = result.io_bytes
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
