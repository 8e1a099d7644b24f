"""Debian packages as the only source of guest software: ``apt-get download`` + ``dpkg-deb -x``.

Nothing here installs anything on the host; packages are fetched into the cache and unpacked into scratch
directories, so the host's own package set never leaks into a guest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from evmm.errors import EvmmError

# Packages whose Depends we follow when bundling shared libraries: Debian policy names library packages lib*
# (plus a few historical exceptions); everything else (python3, debconf, adduser) is not needed to run an ELF.
_LIBRARY_PACKAGE = re.compile(r"^(lib[a-z0-9].*|zlib1g)$")


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EvmmError(f"`{name}` not found: install Debian's {package} package (apt-get install {package})")
    return path


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise EvmmError(f"cannot run {argv[0]}: {e.strerror}") from e
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("W:")]
        why = lines[-1].strip() if lines else f"exit status {r.returncode}"
        raise EvmmError(f"{' '.join(argv[:3])} ... failed: {why}")
    return r.stdout


def parse_depends(text: str) -> dict[str, list[str]]:
    """``apt-cache depends`` output -> {package: [first alternative of each Depends/PreDepends]}.

    Virtual packages (``<name>``) are dropped; an alternative group (``|Depends:``) contributes its first member.
    """
    result: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_group = False
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = result.setdefault(line.strip(), [])
            in_group = False
            continue
        if current is None:
            continue
        m = re.match(r"^\s+(\|?)(Pre)?Depends:\s+(\S+)", line)
        if m is None:
            if not line.startswith("    "):  # deeper lines list a virtual package's providers
                in_group = False
            continue
        alternative, name = m.group(1) == "|", m.group(3)
        if not in_group and not name.startswith("<"):
            current.append(name.split(":")[0])
        in_group = alternative
    return result


def depends(packages: Sequence[str]) -> dict[str, list[str]]:
    require_tool("apt-cache", "apt")
    return parse_depends(_run(["apt-cache", "depends", *packages]))


def resolve_metapackage(meta: str, prefix: str) -> str:
    """The concrete package a metapackage points to, e.g. linux-image-cloud-amd64 -> linux-image-6.1.0-56-cloud-amd64."""
    deps = depends([meta]).get(meta, [])
    for name in deps:
        if name.startswith(prefix):
            return name
    raise EvmmError(
        f"apt-cache knows no {prefix}* behind {meta}: run `apt-get update` (is Debian's apt set up?)"
    )


def library_closure(packages: Sequence[str]) -> list[str]:
    """``packages`` plus every library package they depend on, transitively, in breadth-first order."""
    seen = list(dict.fromkeys(packages))
    frontier = list(seen)
    while frontier:
        found = depends(frontier)
        frontier = []
        for pkg in found.values():
            for dep in pkg:
                if dep not in seen and _LIBRARY_PACKAGE.match(dep):
                    seen.append(dep)
                    frontier.append(dep)
    return seen


def _cached_deb(dest: Path, package: str) -> Path | None:
    # apt-get download names files NAME_VERSION_ARCH.deb (the epoch's ':' escaped as %3a).
    found = sorted(dest.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def download(packages: Iterable[str], dest: Path) -> list[Path]:
    """Fetch each package's .deb into ``dest`` (once: a .deb already there is reused)."""
    require_tool("apt-get", "apt")
    dest.mkdir(parents=True, exist_ok=True)
    wanted = list(dict.fromkeys(packages))
    missing = [p for p in wanted if _cached_deb(dest, p) is None]
    if missing:
        _run(["apt-get", "download", "-q", *missing], cwd=dest)
    debs = []
    for p in wanted:
        deb = _cached_deb(dest, p)
        if deb is None:
            raise EvmmError(f"apt-get download {p} produced no .deb in {dest}")
        debs.append(deb)
    return debs


def unpack(deb: Path, root: Path) -> None:
    require_tool("dpkg-deb", "dpkg")
    root.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(root)])


def depmod(root: Path, version: str) -> None:
    # A kernel .deb ships modules.order and modules.builtin but no modules.dep: depmod writes it.
    _run([require_tool("depmod", "kmod"), "-b", str(root), version])


def kernel_version(root: Path) -> str:
    """The single ``lib/modules/VERSION`` directory of an unpacked linux-image package."""
    versions = (
        sorted(p.name for p in (root / "lib" / "modules").iterdir())
        if (root / "lib" / "modules").is_dir()
        else []
    )
    if len(versions) != 1:
        raise EvmmError(f"{root}: expected one kernel version under lib/modules, found {versions or 'none'}")
    return versions[0]
