"""The test image's archives (evmm/oci/image.py): a reproducible rootfs tar and an OCI image layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from evmm.oci.image import oci_archive, rootfs_tar


def test_rootfs_tar_is_reproducible(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").write_bytes(b"\x7fELF")
    (tmp_path / "bin" / "sh").symlink_to("/bin/busybox")
    first = rootfs_tar(tmp_path)
    (tmp_path / "bin" / "busybox").touch()  # a new mtime changes nothing
    assert rootfs_tar(tmp_path) == first
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "/bin/busybox"
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())


def test_oci_archive_is_a_valid_image_layout() -> None:
    layer = b"a layer tar"
    with tarfile.open(fileobj=io.BytesIO(oci_archive(layer, "evmm.local/busybox:v1"))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}

    def blob(descriptor: dict[str, Any]) -> bytes:
        data = files["blobs/sha256/" + descriptor["digest"].removeprefix("sha256:")]
        assert hashlib.sha256(data).hexdigest() == descriptor["digest"].removeprefix("sha256:")
        assert len(data) == descriptor["size"]
        return data

    [entry] = json.loads(files["index.json"])["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == "evmm.local/busybox:v1"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    manifest = json.loads(blob(entry))
    config = json.loads(blob(manifest["config"]))
    assert gzip.decompress(blob(manifest["layers"][0])) == layer
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
