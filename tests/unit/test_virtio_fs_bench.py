"""The fs benchmark row's pure parts: the two VMMs' share arguments and fio's JSON for the file engines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evmm.bench import fs
from evmm.bench.vmm import EVMM, QEMU_9P, VmSpec
from evmm.errors import EvmmError


def fio_json(name: str, total_ios: int, runtime_ms: int, io_bytes: int = 0, bw: float = 0.0) -> str:
    side = {"total_ios": total_ios, "runtime": runtime_ms, "io_bytes": io_bytes, "bw_bytes": bw}
    empty = {"total_ios": 0, "runtime": 0, "io_bytes": 0, "bw_bytes": 0}
    return "fio: note\n" + json.dumps({"jobs": [{"jobname": name, "error": 0, "read": side, "write": empty}]})


def test_both_vmms_share_the_same_directory_under_one_tag(tmp_path: Path) -> None:
    spec = VmSpec(Path("/k"), Path("/i"), "quiet", 512, share=tmp_path)
    evmm = EVMM.argv(spec)
    assert evmm[evmm.index("--fs") + 1] == f"path={tmp_path},tag=bench,cache=none"
    qemu = QEMU_9P.argv(spec)
    assert f"local,id=share,path={tmp_path},security_model=passthrough" in qemu
    assert "virtio-9p-device,fsdev=share,mount_tag=bench" in qemu
    assert "--fs" not in EVMM.argv(VmSpec(Path("/k"), Path("/i"), "quiet", 512))


def test_fio_file_engines_and_throughput_parse() -> None:
    assert fs.ops_and_seconds(fio_json("filecreate", 1000, 2500), "filecreate") == (1000, 2.5)
    assert fs.bytes_per_second(fio_json("seqread", 32, 10, 1 << 25, 5e7), "seqread") == (1 << 25, 5e7)
    with pytest.raises(EvmmError, match="no such job"):
        fs.ops_and_seconds(fio_json("filestat", 1, 1), "filedelete")
    with pytest.raises(EvmmError, match="no JSON"):
        fs.ops_and_seconds("fio: command not found", "filestat")
    failed = json.dumps({"jobs": [{"jobname": "x", "error": 5}]})
    with pytest.raises(EvmmError, match="error 5"):
        fs.bytes_per_second(failed, "x")


def test_fio_command_lines() -> None:
    cmd = fs.fio_argv(
        "filestat", directory="/mnt/meta", ioengine="filestat", nrfiles=10, filename_format="'f.$filenum'"
    )
    assert cmd == (
        "fio --name=filestat --directory=/mnt/meta --ioengine=filestat --nrfiles=10 "
        "--filename_format='f.$filenum' --output-format=json"
    )
    assert [m.key for m in fs.FsRow().metrics()] == ["fs.meta", "fs.seqwrite", "fs.seqread"]
    assert {m.qemu_side for m in fs.FsRow().metrics()} == {"qemu-9p"}
