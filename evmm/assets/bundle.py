"""Filling an initramfs from unpacked Debian packages: busybox, kernel modules, dynamically linked programs."""

from __future__ import annotations

import lzma
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from evmm.assets import debian
from evmm.assets.elf import dynamic_info
from evmm.assets.initramfs import Archive
from evmm.assets.modules import load_order, module_name, parse_builtin, parse_modules_dep
from evmm.errors import EvmmError

# Where Debian's ld.so looks without an ld.so.cache ("system search path" in `ld.so --help`): bundled
# libraries go to the first, whatever package directory they came from.
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
MODULES_LOAD = "etc/evmm/modules.load"  # "NAME PATH" per line, in load order, read by the init scripts
KERNEL_VERSION = "etc/evmm/kernel-version"


def base_layout(archive: Archive) -> None:
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "mnt",
        "etc/evmm",
    ):
        archive.directory(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for /init's stdio before anything can mount devtmpfs.
    archive.char_device("dev/console", 5, 1)


def add_busybox(archive: Archive, busybox: Path) -> None:
    """Busybox at /bin/busybox plus a symlink for each applet at the path busybox itself names."""
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    try:
        listing = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise EvmmError(f"{busybox}: cannot list its applets ({e})") from e
    for applet in listing.split():
        if applet not in archive and PurePosixPath(applet).name != "busybox":
            archive.symlink(applet, "/bin/busybox")


def _read_deps(mdir: Path) -> tuple[dict[str, list[str]], set[str]]:
    """modules.dep and the names built in, of the unpacked kernel modules directory ``mdir``."""
    try:
        deps = parse_modules_dep((mdir / "modules.dep").read_text())
        builtin_file = mdir / "modules.builtin"
        builtin = parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    except OSError as e:
        raise EvmmError(f"{mdir}: cannot read modules.dep ({e.strerror}): was depmod run?") from e
    return deps, builtin


def _add_module(archive: Archive, mdir: Path, version: str, rel: str) -> str:
    """The module file ``rel`` into the archive, uncompressed (busybox insmod and modprobe take plain .ko
    files); its path relative to lib/modules/VERSION."""
    data = _module_bytes(mdir, rel)
    rel = rel.removesuffix(".xz")
    if f"lib/modules/{version}/{rel}" not in archive:
        archive.file(f"lib/modules/{version}/{rel}", data)
    return rel


def _module_bytes(mdir: Path, rel: str) -> bytes:
    data = (mdir / rel).read_bytes()
    return lzma.decompress(data) if rel.endswith(".xz") else data


def add_modules(archive: Archive, kroot: Path, version: str, names: Sequence[str]) -> list[str]:
    """The modules ``names`` and their dependencies, plus the load list the init reads; returns module names."""
    mdir = kroot / "lib" / "modules" / version
    deps, builtin = _read_deps(mdir)
    order = load_order(deps, names, builtin, what=f"kernel {version}")
    lines = []
    for rel in order:
        rel = _add_module(archive, mdir, version, rel)
        lines.append(f"{module_name(rel)} {rel}\n")
    archive.file(MODULES_LOAD, "".join(lines).encode())
    archive.file(KERNEL_VERSION, f"{version}\n".encode())
    return [module_name(rel) for rel in order]


def add_modprobe_modules(archive: Archive, kroot: Path, version: str, names: Sequence[str]) -> list[str]:
    """The modules ``names`` and their dependencies, left for the kernel to load when first asked for.

    Not in the load list: the kernel's request_module() runs /sbin/modprobe (busybox's) when a netfilter
    table, a filesystem type or a qdisc is first used, so they cost a boot nothing until then.  depmod(8)
    indexes every module in the archive (those of ``add_modules`` too) in a scratch tree, and its files go
    in: busybox modprobe reads modules.dep and modules.alias, kmod's the .bin indexes.  Returns the names
    of ``names`` and their dependencies.
    """
    mdir = kroot / "lib" / "modules" / version
    deps, builtin = _read_deps(mdir)
    added = [
        module_name(_add_module(archive, mdir, version, rel))
        for rel in load_order(deps, names, builtin, what=f"kernel {version}")
    ]
    with tempfile.TemporaryDirectory(prefix="evmm-depmod-") as scratch:
        sdir = Path(scratch) / "lib" / "modules" / version
        for rel in deps:
            plain = rel.removesuffix(".xz")
            if f"lib/modules/{version}/{plain}" in archive:
                (sdir / plain).parent.mkdir(parents=True, exist_ok=True)
                (sdir / plain).write_bytes(_module_bytes(mdir, rel))
        for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (mdir / name).exists():
                shutil.copy(mdir / name, sdir / name)
        debian.depmod(Path(scratch), version)
        for index in sorted(sdir.glob("modules.*")):
            if f"lib/modules/{version}/{index.name}" not in archive:
                archive.file(f"lib/modules/{version}/{index.name}", index.read_bytes())
    return added


def resolve_in(root: Path, path: str) -> Path:
    """``path`` inside the unpacked tree ``root``, following symlinks as if ``root`` were '/'."""
    current = PurePosixPath("/", path.lstrip("/"))
    for _ in range(40):
        resolved = PurePosixPath("/")
        for i, part in enumerate(current.parts[1:], start=1):
            candidate = resolved / part
            host = root / str(candidate).lstrip("/")
            if host.is_symlink():
                target = PurePosixPath(str(host.readlink()))
                base = target if target.is_absolute() else candidate.parent / target
                current = PurePosixPath("/", *base.parts[1:], *current.parts[i + 1 :])
                break
            resolved = candidate
        else:
            return root / str(resolved).lstrip("/")
    raise EvmmError(f"{root}: too many symlinks resolving {path}")


def _find_library(root: Path, soname: str, runpath: tuple[str, ...], origin: str) -> Path | None:
    # $ORIGIN is the directory of the object that names the library (ld.so(8), "Dynamic string tokens").
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in runpath]
    for d in [*dirs, *LIBRARY_DIRS]:
        candidate = resolve_in(root, f"{d.lstrip('/')}/{soname}")
        if candidate.is_file():
            return candidate
    return None


def add_program(archive: Archive, root: Path, program: str) -> list[str]:
    """``program`` (an absolute path in ``root``) with its interpreter and every shared library it needs.

    Returns the sonames bundled.  A library missing from ``root`` is an error naming it and who needs it.
    """
    queue = [(program, resolve_in(root, program))]
    bundled: list[str] = []
    while queue:
        guest_path, host_path = queue.pop(0)
        if not host_path.is_file():
            raise EvmmError(f"{program}: {guest_path} is not in the unpacked packages at {root}")
        data = host_path.read_bytes()
        if guest_path not in archive:
            archive.file(guest_path, data, 0o755)
        info = dynamic_info(data, str(host_path))
        if info.interpreter and info.interpreter not in archive:
            queue.append((info.interpreter, resolve_in(root, info.interpreter)))
        for soname in info.needed:
            target = f"{LIBRARY_DIRS[0]}/{soname}"
            if target in archive or any(q[0] == target for q in queue):
                continue
            origin = "/" + str(host_path.parent.relative_to(root))
            found = _find_library(root, soname, info.runpath, origin)
            if found is None:
                raise EvmmError(f"{program}: {guest_path} needs {soname}, which no unpacked package provides")
            queue.append((target, found))
            bundled.append(soname)
    return bundled
