"""A small container image built locally, for evmm-oci's tests and benchmark (no registry is reachable).

The root filesystem is Debian's busybox-static (fetched with evmm's Debian tooling, evmm/assets/debian.py, or
taken from the cache where it already is) with every applet linked, plus the few files a container expects.
It goes to the engines as a plain tar (``docker import``, ``podman import``) or as an OCI image layout in a tar
(``ctr images import``; image-spec image-layout.md), written here byte for byte reproducibly.  Also here: the
wiring the tests and the benchmark share, a runtime script for the engines to exec and podman's options for
a store of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evmm.assets import debian
from evmm.assets.cache import cache_root
from evmm.errors import EvmmError

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "container\n",
}
DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var")


def busybox_rootfs(dest: Path, cache: Path | None = None) -> Path:
    """``dest`` made a busybox root filesystem; returns it."""
    debs = cache_root(cache) / "debs"
    [deb] = debian.download(["busybox-static"], debs)
    with tempfile.TemporaryDirectory(prefix="evmm-busybox-") as tmp:
        debian.unpack(deb, Path(tmp))
        busybox = (Path(tmp) / "bin" / "busybox").read_bytes()
    for d in DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "bin" / "busybox").write_bytes(busybox)
    (dest / "bin" / "busybox").chmod(0o755)
    try:
        applets = subprocess.run(
            [str(dest / "bin" / "busybox"), "--list-full"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise EvmmError(f"busybox --list-full: {e}") from None
    for applet in applets:
        link = dest / applet
        if not link.exists() and link.name != "busybox":
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    for name, text in FILES.items():
        (dest / name).write_text(text)
    return dest


def rootfs_tar(rootfs: Path) -> bytes:
    """The tree as a tar, owned by root, mtime 0, in name order: the same bytes every time."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = 0
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False, filter=normalise)
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def oci_archive(layer: bytes, name: str, cmd: tuple[str, ...] = ("sh",)) -> bytes:
    """An OCI image layout (index.json, oci-layout, blobs/sha256/...) as a tar, of one layer and ``name``."""
    blobs: dict[str, bytes] = {}
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [PATH_ENV], "Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(blobs, json.dumps(config, sort_keys=True).encode()),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                **_blob(blobs, gzip.compress(layer, mtime=0)),
            }
        ],
    }
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(blobs, json.dumps(manifest, sort_keys=True).encode()),
                "platform": {"architecture": "amd64", "os": "linux"},
                # containerd names the imported image after io.containerd.image.name (ctr images import).
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
        **{f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in sorted(blobs.items())},
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dname in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(dname)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for fname, data in files.items():
            info = tarfile.TarInfo(fname)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def runtime_script(where: Path, options: Sequence[str] = ()) -> Path:
    """An executable running this evmm's ``python -m evmm.oci`` with the global ``options``, for an engine to
    exec as its runtime (the console script ``evmm-oci`` may be another checkout's)."""
    root = Path(__file__).resolve().parents[2]
    script = where / "evmm-oci"
    words = shlex.join([sys.executable, "-m", "evmm.oci", *options])
    script.write_text(f'#!/bin/sh\nPYTHONPATH={root} exec {words} "$@"\n')
    script.chmod(0o755)
    return script


def podman_options(where: Path) -> list[str]:
    """podman's global options for a store of its own under ``where`` (no daemon, no systemd)."""
    return [
        *("--root", str(where / "root"), "--runroot", str(where / "run"), "--tmpdir", str(where / "tmp")),
        *("--cgroup-manager", "cgroupfs", "--events-backend", "file", "--storage-driver", "overlay"),
    ]
