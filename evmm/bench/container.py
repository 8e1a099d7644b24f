"""Row 7: container: evmm-oci against runc (the floor: no VM at all), both through podman, in the same run.

- latency: ``podman run --rm IMG true``, wall time from the command's start to its exit (podman's own work,
  the runtime's create/start/delete, the container's life);
- steady RSS per running container: ``COUNT`` containers left running (``sleep``), then the resident memory
  of each container's whole process tree on the host (conmon and everything under it: for evmm-oci the
  monitor, its VMM and so the guest's touched RAM; for runc the container's processes), divided by COUNT.

The image is evmm-oci's busybox test image (evmm/oci/image.py), imported into a podman store of the row's
own.  The table's reference column holds runc for this row.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from evmm.bench.context import Context, Measurement, Watch
from evmm.bench.density import rss
from evmm.bench.results import MetricSpec
from evmm.bench.vmm import EVMM, Side
from evmm.errors import EvmmError
from evmm.oci.image import busybox_rootfs, podman_options, rootfs_tar, runtime_script

RUNC = Side("runc", "runc")
IMAGE = "evmm.local/busybox:latest"
RUNS_PER_MEASURE = 5
QUICK_RUNS = 2
COUNT = 4
QUICK_COUNT = 2
MiB = 1 << 20
TIMEOUT = 600.0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def conmon_of(container_id: str) -> int | None:
    """The conmon process podman started for ``container_id`` (its command line names the id)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"conmon") and container_id.encode() in b" ".join(argv):
            return int(proc.name)
    return None


class ContainerRow:
    name = "container"
    sides = (EVMM, RUNC)

    def __init__(self) -> None:
        self.base: list[str] = []
        self.runtime = Path()

    def metrics(self) -> list[MetricSpec]:
        return [
            MetricSpec(
                "container.run",
                "container",
                "container: podman run --rm IMG true (evmm-oci vs runc)",
                "ms",
                "lower",
                qemu_side=RUNC.name,
            ),
            MetricSpec(
                "container.rss",
                "container",
                "container: resident memory per running container (evmm-oci vs runc)",
                "MiB",
                "lower",
                qemu_side=RUNC.name,
            ),
        ]

    def setup(self, ctx: Context) -> None:
        where = ctx.workdir / "container"
        where.mkdir(parents=True, exist_ok=True)
        rootfs = busybox_rootfs(where / "rootfs")
        (where / "rootfs.tar").write_bytes(rootfs_tar(rootfs))
        self.runtime = runtime_script(where)
        self.base = ["podman", *podman_options(where / "podman")]
        self._podman("import", str(where / "rootfs.tar"), IMAGE)

    def teardown(self, ctx: Context) -> None:
        if self.base:
            self._podman("rm", "-af", check=False)

    def _podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if check and r.returncode != 0:
            raise EvmmError(f"podman {' '.join(args[:3])}: {(r.stderr or r.stdout).strip()[-300:]}")
        return r

    def _runtime(self, side: Side) -> str:
        return "runc" if side.name == RUNC.name else str(self.runtime)

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        runtime = self._runtime(side)
        times = []
        for _ in range(QUICK_RUNS if ctx.quick else RUNS_PER_MEASURE):
            start = time.monotonic()
            self._podman("--runtime", runtime, "run", "--rm", "--network", "none", IMAGE, "true")
            times.append((time.monotonic() - start) * 1000)
        count = QUICK_COUNT if ctx.quick else COUNT
        ids = []
        try:
            for _ in range(count):
                r = self._podman(
                    "--runtime", runtime, "run", "-d", "--network", "none", IMAGE, "sleep", "3600"
                )
                ids.append(r.stdout.strip())
            time.sleep(2)  # settled: the guests idle at their sleep
            total = 0
            for cid in ids:
                conmon = conmon_of(cid)
                if conmon is None:
                    raise EvmmError(f"no conmon found for container {cid[:12]}")
                total += sum(rss(p) for p in tree(conmon))
        finally:
            if ids:
                self._podman("rm", "-f", "-t", "0", *ids, check=False)
        out = Measurement()
        out.values["container.run"] = statistics.median(times)
        out.values["container.rss"] = total / count / MiB
        ctx.say(
            f"container: {side.name} run {statistics.median(times):.0f} ms, {total / count / MiB:.1f} MiB"
        )
        return out
