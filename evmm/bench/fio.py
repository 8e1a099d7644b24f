"""fio jobs for the virtio-blk row, and their JSON results (pure: command lines and parsing).

Every job has a fixed amount of work (``size`` or ``io_size``, a fixed ``randseed``) rather than a duration,
so that both VMMs do the same I/O and the benchmark can check it: fio's ``io_bytes`` must match.  The guest
reads and writes ``/dev/vda`` with ``direct=1`` (no guest page cache: every request reaches the device) through
libaio, fio's usual engine for queue depths above 1.
"""

from __future__ import annotations

import json
from typing import Any

from evmm.record import record

MiB = 1 << 20


class FioError(Exception):
    pass


@record(frozen=True)
class FioJob:
    name: str  # also the metric's suffix
    rw: str  # read, write, randread
    bs: int
    iodepth: int
    bytes: int  # the work: size (sequential) or io_size (random)

    def argv(self, device: str = "/dev/vda") -> list[str]:
        sized = "size" if not self.rw.startswith("rand") else "io_size"
        return [
            "fio",
            f"--name={self.name}",
            f"--filename={device}",
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            f"--iodepth={self.iodepth}",
            "--ioengine=libaio",
            "--direct=1",
            f"--{sized}={self.bytes}",
            "--randrepeat=1",
            "--randseed=1234",
            "--norandommap",
            "--output-format=json",
        ]


@record(frozen=True)
class FioResult:
    job: str
    rw: str  # "read" or "write": the direction fio reports
    io_bytes: int
    bw_bytes: float  # bytes per second
    iops: float
    runtime_ms: int

    @property
    def mb_s(self) -> float:
        return self.bw_bytes / 1e6


def jobs(image_bytes: int, quick: bool) -> list[FioJob]:
    """The row's four jobs; sequential ones cover ``image_bytes`` (1/4 of it when ``quick``)."""
    seq = image_bytes // (4 if quick else 1)
    rand1 = (4 if quick else 16) * MiB
    rand32 = (16 if quick else 64) * MiB
    return [
        FioJob("seqread", "read", MiB, 8, seq),
        FioJob("seqwrite", "write", MiB, 8, seq),
        FioJob("randread-qd1", "randread", 4096, 1, rand1),
        FioJob("randread-qd32", "randread", 4096, 32, rand32),
    ]


def _json_object(text: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise FioError(f"no JSON in fio's output: {text.strip()[:200]!r}")
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError as e:
        raise FioError(f"fio's JSON does not parse: {e}") from None
    if not isinstance(data, dict):
        raise FioError("fio's JSON is not an object")
    return data


def parse(text: str, job: str) -> FioResult:
    """fio's ``--output-format=json`` (possibly with warnings around it): the named job's one direction."""
    data = _json_object(text)
    for j in data.get("jobs", []):
        if j.get("jobname") != job:
            continue
        if j.get("error"):
            raise FioError(f"fio job {job} failed with error {j['error']}")
        rw = max(("read", "write"), key=lambda d: int(j.get(d, {}).get("io_bytes", 0)))
        d = j[rw]
        if int(d.get("io_bytes", 0)) == 0:
            raise FioError(f"fio job {job} did no I/O")
        return FioResult(
            job=job,
            rw=rw,
            io_bytes=int(d["io_bytes"]),
            bw_bytes=float(d["bw_bytes"]),
            iops=float(d["iops"]),
            runtime_ms=int(d["runtime"]),
        )
    raise FioError(f"no job {job!r} in fio's JSON")
