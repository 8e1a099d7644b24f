"""For ``evmm doctor``: is each container engine on this host installed, and set up to use evmm-oci?

Each engine's configuration is read where it keeps it by default (the paths docs/oci.md shows): docker's
daemon.json ``runtimes``, podman's containers.conf ``[engine.runtimes]``, containerd's config.toml runc-shim
runtimes with ``BinaryName``.  A runtime counts when its path's last component is ``evmm-oci``.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

from evmm.record import record

RUNTIME = "evmm-oci"
DOCKER_CONF = Path("/etc/docker/daemon.json")
PODMAN_CONFS = (Path("/etc/containers/containers.conf"), Path("/usr/share/containers/containers.conf"))
CONTAINERD_CONF = Path("/etc/containerd/config.toml")


@record(frozen=True)
class EngineStatus:
    engine: str
    installed: bool
    wired: bool  # a runtime pointing at evmm-oci is configured
    detail: str  # how to use it, or what to do


def _is_ours(path: object) -> bool:
    return isinstance(path, str) and Path(path).name == RUNTIME


def docker_runtimes(text: str) -> list[str]:
    """The names of daemon.json's runtimes that run evmm-oci."""
    try:
        conf = json.loads(text)
    except ValueError:
        return []
    runtimes = conf.get("runtimes") if isinstance(conf, dict) else None
    if not isinstance(runtimes, dict):
        return []
    return sorted(n for n, r in runtimes.items() if isinstance(r, dict) and _is_ours(r.get("path")))


def podman_runtimes(text: str) -> list[str]:
    """The names of containers.conf's [engine.runtimes] whose paths include evmm-oci."""
    try:
        conf = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    runtimes = conf.get("engine", {}).get("runtimes", {})
    return sorted(n for n, paths in runtimes.items() if isinstance(paths, list) and any(map(_is_ours, paths)))


def containerd_runtimes(text: str) -> list[str]:
    """The CRI runtimes of config.toml (version 2) whose runc shim runs evmm-oci (options.BinaryName)."""
    try:
        conf = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    cri: dict[str, Any] = conf.get("plugins", {}).get("io.containerd.grpc.v1.cri", {})
    runtimes = cri.get("containerd", {}).get("runtimes", {})
    return sorted(
        n
        for n, r in runtimes.items()
        if isinstance(r, dict) and _is_ours(r.get("options", {}).get("BinaryName"))
    )


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def engines() -> list[EngineStatus]:
    out = []
    names = docker_runtimes(_read(DOCKER_CONF))
    out.append(
        EngineStatus(
            "docker",
            shutil.which("dockerd") is not None,
            bool(names),
            f"docker run --runtime {names[0]} ..."
            if names
            else f'add "runtimes": {{"evmm": {{"path": "{RUNTIME}"}}}} to {DOCKER_CONF}',
        )
    )
    found = next((n for p in PODMAN_CONFS for n in podman_runtimes(_read(p))), None)
    out.append(
        EngineStatus(
            "podman",
            shutil.which("podman") is not None,
            found is not None,
            f"podman --runtime {found} ..." if found else f"podman --runtime {RUNTIME} ... (works as is)",
        )
    )
    names = containerd_runtimes(_read(CONTAINERD_CONF))
    out.append(
        EngineStatus(
            "containerd",
            shutil.which("containerd") is not None,
            bool(names),
            f"CRI runtime handler {names[0]}"
            if names
            else f"ctr run --runtime io.containerd.runc.v2 --runc-binary {RUNTIME} ...; for CRI set BinaryName"
            f" in {CONTAINERD_CONF}",
        )
    )
    return out


def runtime_on_path() -> str | None:
    return shutil.which(RUNTIME)
