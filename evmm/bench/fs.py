"""Row 7: a shared directory, evmm's virtio-fs against QEMU's virtio-9p: metadata ops/s and sequential MB/s.

Both guests run Debian's *generic* kernel (the cloud kernel has no 9p) with the same initramfs: the tools
initramfs (busybox, fio) with a second archive appended, holding the generic kernel's virtio_mmio, virtio_pci,
fuse, virtiofs and 9p modules and the init's module list for that kernel (Linux unpacks concatenated cpio archives
in order, later files replacing earlier ones).  It is made from the generic kernel's .deb in the evmm cache,
into the cache, before the benchmark enters the KVM test host (``prepare``).

Each run shares a fresh empty directory in the scratch space (a tmpfs inside the test host), mounted with no
caching on either side (evmm ``cache=none``; 9p's default ``cache=none``), so that every read and write
reaches the VMM.  fio does the work, fixed in size so both sides do the same: a sequential write then read
of one file in 1 MiB blocks (the guest's page cache dropped between), and create, stat and unlink of N
small files (fio's filecreate, filestat and filedelete engines); metadata ops/s is the three phases'
operations over their summed run time.

evmm runs on the board ``--machine`` names; QEMU always on q35 with ``virtio-9p-pci`` (``measure`` says why
QEMU microvm cannot serve this kernel), so ``--machine standard`` compares PCI with PCI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from evmm.assets import debian
from evmm.assets.bundle import add_modules
from evmm.assets.cache import cache_root, write_atomic
from evmm.assets.initramfs import Archive
from evmm.bench.console import PROMPT, READY
from evmm.bench.context import Context, Measurement, Watch, launch
from evmm.bench.results import Better, MetricSpec
from evmm.bench.vmm import EVMM, QEMU_9P, SHARE_TAG, Side
from evmm.errors import EvmmError

MiB = 1 << 20
MEMORY_MIB = 512
SEQ_MIB, QUICK_SEQ_MIB = 128, 32
META_FILES, QUICK_META_FILES = 1000, 100
JOB_TIMEOUT = 900.0
# The generic kernel probes far more than the cloud one: 142 s to the ready line on evmm in the KVM test
# host under a load of 16 (the cloud kernel: 5-20 s).
BOOT_TIMEOUT = 600.0
# virtio_pci for QEMU's side, on q35 (see FsRow.measure), and for evmm's standard board.
MODULES = ("virtio_mmio", "virtio_pci", "fuse", "virtiofs", "9pnet_virtio", "9p")
MOUNT = {
    "evmm": f"mount -t virtiofs {SHARE_TAG} /mnt",
    "qemu": f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 {SHARE_TAG} /mnt",
}
_METRICS: tuple[tuple[str, str, str, Better], ...] = (
    ("fs.meta", "shared dir: create+stat+unlink of small files", "ops/s", "higher"),
    ("fs.seqwrite", "shared dir: sequential write, 1 MiB", "MB/s", "higher"),
    ("fs.seqread", "shared dir: sequential read, 1 MiB", "MB/s", "higher"),
)


def fio_argv(name: str, **opts: object) -> str:
    args = " ".join(f"--{k}={v}" for k, v in opts.items())
    return f"fio --name={name} {args} --output-format=json"


def _job(text: str, name: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise EvmmError(f"fio {name}: no JSON in its output: {text.strip()[:200]!r}")
    for j in json.loads(text[start : end + 1]).get("jobs", []):
        if j.get("jobname") == name:
            if j.get("error"):
                raise EvmmError(f"fio {name} failed with error {j['error']}")
            return dict(j)
    raise EvmmError(f"fio {name}: no such job in its JSON")


def ops_and_seconds(text: str, name: str) -> tuple[int, float]:
    """(operations, seconds) of one fio job: the file engines count one 'read' per file they act on."""
    j = _job(text, name)
    d = max((j["read"], j["write"]), key=lambda x: int(x["total_ios"]))
    return int(d["total_ios"]), int(d["runtime"]) / 1000


def bytes_per_second(text: str, name: str) -> tuple[int, float]:
    j = _job(text, name)
    d = max((j["read"], j["write"]), key=lambda x: int(x["io_bytes"]))
    return int(d["io_bytes"]), float(d["bw_bytes"])


def fs_initramfs(cache: Path | None = None) -> Path:
    """The tools initramfs plus the generic kernel's modules (see the module docstring), built into the evmm
    cache once (natively: unpacking a kernel package inside the TCG test host took minutes)."""
    from evmm.assets import default_guest
    from evmm.testhost.assets import testhost_assets

    root = cache_root(cache)
    version = testhost_assets(root).kernel_version
    tools = default_guest(root).tools_initramfs
    tag = hashlib.sha256(" ".join(MODULES).encode()).hexdigest()[:8]  # a new module list, a new archive
    out = root / "bench" / f"fs-initramfs-{version}-{tag}.cpio.gz"
    if out.is_file() and out.stat().st_mtime >= tools.stat().st_mtime:
        return out
    if os.environ.get("EVMM_IN_TESTHOST") == "1":
        raise EvmmError(f"{out} is missing: run `evmm bench --only fs` outside the test host first")
    debs = sorted((root / "debs").glob(f"linux-image-{version}_*.deb"))
    if not debs:
        raise EvmmError(f"no linux-image-{version} .deb in {root / 'debs'}: run `evmm assets`")
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        kroot = Path(scratch) / "generic"
        debian.unpack(debs[-1], kroot)
        debian.depmod(kroot, version)
        archive = Archive()
        add_modules(archive, kroot, version, MODULES)
    write_atomic(out, tools.read_bytes() + archive.to_gzip())
    return out


def prepare() -> None:
    """What the row needs built before the benchmark enters the test host (whose root is read-only)."""
    fs_initramfs()


class FsRow:
    name = "fs"
    sides = (EVMM, QEMU_9P)

    def __init__(self) -> None:
        self.kernel: Path | None = None
        self.initrd: Path | None = None
        self.seq_mib = SEQ_MIB
        self.files = META_FILES

    def metrics(self) -> list[MetricSpec]:
        note = "evmm virtio-fs (cache=none) vs QEMU virtio-9p (cache=none), generic kernel"
        return [MetricSpec(k, "fs", t, u, b, qemu_side=QEMU_9P.name, note=note) for k, t, u, b in _METRICS]

    def setup(self, ctx: Context) -> None:
        from evmm.testhost.assets import testhost_assets

        self.kernel = testhost_assets().kernel
        self.initrd = fs_initramfs()
        self.seq_mib = QUICK_SEQ_MIB if ctx.quick else SEQ_MIB
        self.files = QUICK_META_FILES if ctx.quick else META_FILES
        ctx.say(f"fs: generic kernel {self.kernel.name}, initramfs {self.initrd}")

    def teardown(self, ctx: Context) -> None:
        shutil.rmtree(ctx.workdir / "fs-share", ignore_errors=True)

    def measure(self, side: Side, ctx: Context, watch: Watch | None) -> Measurement:
        assert self.kernel is not None and self.initrd is not None, "setup() first"
        share = ctx.workdir / "fs-share"
        shutil.rmtree(share, ignore_errors=True)
        share.mkdir()
        spec = replace(ctx.spec(MEMORY_MIB), kernel=self.kernel, initrd=self.initrd, share=share)
        if side.vmm == "qemu":
            # QEMU's 9p on its PCI board: QEMU microvm's ACPI tables reach this generic kernel unreadable
            # ("ACPI: Interpreter disabled", no virtio-mmio device found; QEMU 10.0, measured in the test
            # host), and without ACPI the kernel's modular virtio_mmio never learns of the devices.
            words = [w for w in spec.append.split() if w != "pci=off"]
            spec = replace(spec, machine="standard", append=" ".join(words))
        out = Measurement()
        seq = {
            "directory": "/mnt",
            "filename": "seq",
            "bs": "1M",
            "size": f"{self.seq_mib}M",
            "ioengine": "psync",
        }
        # Each step says something: under the test host a run takes longer than its stall limit (600 s of
        # silence), and what is said is its sign of life.
        say = ctx.say
        started = time.monotonic()
        with launch(side, spec, f"{side.name}-fs", watch) as vm:
            _, ready = vm.wait_for(READY, max(ctx.boot_timeout, BOOT_TIMEOUT))
            say(f"fs {side.name}: ready after {ready - started:.0f} s")
            vm.wait_for(PROMPT, 60)
            vm.check(MOUNT[side.vmm] + " && mkdir /mnt/meta", 60)
            text = vm.check(fio_argv("seqwrite", rw="write", end_fsync=1, **seq), JOB_TIMEOUT)
            out.work["fs.seqwrite"], out.values["fs.seqwrite"] = bytes_per_second(text, "seqwrite")
            out.values["fs.seqwrite"] /= 1e6
            say(f"fs {side.name}: seqwrite {out.values['fs.seqwrite']:.3g} MB/s")
            vm.check("sync; echo 3 > /proc/sys/vm/drop_caches", 60)
            text = vm.check(fio_argv("seqread", rw="read", **seq), JOB_TIMEOUT)
            out.work["fs.seqread"], out.values["fs.seqread"] = bytes_per_second(text, "seqread")
            out.values["fs.seqread"] /= 1e6
            say(f"fs {side.name}: seqread {out.values['fs.seqread']:.3g} MB/s")
            ops, seconds = 0, 0.0
            for engine in ("filecreate", "filestat", "filedelete"):
                job = fio_argv(
                    engine, directory="/mnt/meta", ioengine=engine, nrfiles=self.files, filesize="4k",
                    bs="4k", openfiles=1, fallocate="none", filename_format="'f.$filenum'",
                    create_on_open=1,  # else fio first lays out (writes) the empty files filestat finds
                )  # fmt: skip
                n, s = ops_and_seconds(vm.check(job, JOB_TIMEOUT), engine)
                ops, seconds = ops + n, seconds + s
                say(f"fs {side.name}: {engine} {n} files in {s:.3g} s")
            out.work["fs.meta"] = ops
            out.values["fs.meta"] = ops / seconds if seconds > 0 else 0.0
            if sorted(p.name for p in share.iterdir()) != ["meta", "seq"] or any((share / "meta").iterdir()):
                left = sorted(share.rglob("*"))[:5]
                raise EvmmError(f"{side.name}: the share does not hold what the jobs left: {left}")
            vm.sendline("poweroff")
            vm.wait_exit(120)
        return out
