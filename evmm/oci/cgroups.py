"""The container's cgroup (config.json ``linux.cgroupsPath``) on the host, cgroup v2 only.

The monitor and its VMM join it, so the engine's view of the container's resources (``docker stats``, ``podman
stats``) is the VM's, and ``cpu.shares`` becomes the VM's ``cpu.weight``.  The memory limit is not set on the
cgroup: it sizes the guest (evmm/oci/spec.py), and a cgroup limit that small would have the host kill the VMM.
With ``--systemd-cgroup`` the path is systemd's ``slice:prefix:name``, a scope in the slice's tree (made
directly, as runc does where systemd is not running).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from evmm.errors import EvmmError

ROOT = Path("/sys/fs/cgroup")


def expand_slice(slice_name: str) -> str:
    """systemd's slice name to its path: ``machine-foo.slice`` -> ``machine.slice/machine-foo.slice``."""
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise EvmmError(f"cgroupsPath: {slice_name!r} is not a systemd slice name")
    if slice_name == "-.slice":
        return ""
    parts = slice_name.removesuffix(".slice").split("-")
    if not all(parts):
        raise EvmmError(f"cgroupsPath: {slice_name!r} is not a systemd slice name")
    return "/".join(f"{'-'.join(parts[: i + 1])}.slice" for i in range(len(parts)))


def cgroup_dir(cgroups_path: str, systemd: bool, container_id: str, root: Path = ROOT) -> Path:
    """Where the container's cgroup lives under ``root``."""
    if systemd:
        parts = cgroups_path.split(":")
        if len(parts) != 3:
            raise EvmmError(f"cgroupsPath {cgroups_path!r} is not slice:prefix:name (--systemd-cgroup)")
        slice_name, prefix, name = parts
        scope = f"{prefix}-{name or container_id}.scope" if prefix else f"{name or container_id}.scope"
        rel = "/".join(p for p in (expand_slice(slice_name or "system.slice"), scope) if p)
    else:
        rel = cgroups_path.lstrip("/")
    path = (root / rel).resolve()
    if path != root and not path.is_relative_to(root):
        raise EvmmError(f"cgroupsPath {cgroups_path!r} leaves the cgroup tree")
    return path


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), the conversion runc and crun use."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def join(path: Path, pid: int, weight: int | None = None) -> None:
    """Make the cgroup ``path`` (and its parents) and move ``pid`` into it."""
    if not (ROOT / "cgroup.controllers").exists() and path.is_relative_to(ROOT):
        raise EvmmError(f"{ROOT} is not a cgroup v2 mount; evmm-oci needs cgroup v2 for linux.cgroupsPath")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if weight is not None:
            with contextlib.suppress(OSError):  # the cpu controller may not be enabled for this subtree
                (path / "cpu.weight").write_text(str(weight))
        (path / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        raise EvmmError(f"cgroup {path}: {e.strerror}") from None


def remove(path: Path) -> None:
    """The cgroup, once empty (its processes are gone); quiet when it is already gone."""
    with contextlib.suppress(OSError):
        os.rmdir(path)
