"""A guest on Debian's *generic* 6.1 kernel: the default guest's init and tools, for what the cloud kernel lacks.

Debian's cloud kernel (the default guest) is built without CONFIG_VIRT_DRIVERS, so without the vmgenid
driver: a clone of one of its snapshots cannot learn that it was cloned, and draws the same random numbers
as its siblings until its RNG reseeds by itself.  The generic kernel has CONFIG_VMGENID=y; it is the test
host's kernel too, so this reuses its download.  Its filesystems and virtio drivers are modules, loaded by
the same init as the default guest's.

Layout in the cache: ``guest-generic/VERSION/{vmlinux,initramfs-tools.cpio.gz}`` and ``guest-generic.json``.
"""

from __future__ import annotations

from pathlib import Path

from evmm import agent
from evmm.assets import bundle, debian
from evmm.assets.cache import cache_root, read_manifest, write_atomic, write_manifest
from evmm.assets.guest import MODULES, TOOL_PACKAGES, TOOL_PROGRAMS, _init_files, recipe_id
from evmm.assets.initramfs import Archive
from evmm.assets.kernel import extract_vmlinux
from evmm.assets.workspace import Step, Workspace, no_progress
from evmm.errors import EvmmError
from evmm.record import record

KERNEL_METAPACKAGE = "linux-image-amd64"
KERNEL_PREFIX = "linux-image-"
GENERIC_MODULES = (
    *MODULES,
    "crc32c_generic",
    "ext4",
)  # built into the cloud kernel; ext4 asks crypto for crc32c
MANIFEST = "guest-generic.json"


@record(frozen=True)
class GenericGuest:
    vmlinux: Path
    initramfs: Path  # busybox, the virtio modules, fio, iperf3, socat: the default guest's tools variant
    kernel_version: str


def recipe() -> str:
    """What goes into the initramfs besides the packages: a change rebuilds a guest an older evmm built."""
    return f"{recipe_id()}/{','.join(GENERIC_MODULES)}"


def generic_guest(cache: Path | None = None) -> GenericGuest:
    root = cache_root(cache)
    manifest = read_manifest(root / MANIFEST) or {}
    if manifest.get("recipe") != recipe():
        manifest = {}
    try:
        found = GenericGuest(
            root / manifest["vmlinux"], root / manifest["initramfs"], manifest["kernel_version"]
        )
    except KeyError:
        found = None
    if found is None or not (found.vmlinux.is_file() and found.initramfs.is_file()):
        raise EvmmError(f"no generic-kernel guest in {root}: build it with build_generic_guest()")
    return found


def build_generic_guest(cache: Path | None = None, *, step: Step = no_progress) -> GenericGuest:
    """Build (or find) the generic-kernel guest; about a minute the first time, from Debian packages."""
    root = cache_root(cache)
    try:
        return generic_guest(root)
    except EvmmError:
        pass
    with Workspace(root, step) as ws:
        kroot, version = ws.fetch_kernel(KERNEL_METAPACKAGE, KERNEL_PREFIX)
        busybox = ws.fetch_busybox()
        out = root / "guest-generic" / version
        bzimage = (kroot / "boot" / f"vmlinuz-{version}").read_bytes()
        step(f"extracting vmlinux from vmlinuz-{version}")
        write_atomic(out / "vmlinux", extract_vmlinux(bzimage, f"vmlinuz-{version}"))
        archive = Archive()
        bundle.base_layout(archive)
        bundle.add_busybox(archive, busybox)
        bundle.add_modules(archive, kroot, version, GENERIC_MODULES)
        _init_files(archive, agent.build(root))
        tools = ws.fetch(debian.library_closure(list(TOOL_PACKAGES)), into="tools")
        for program in TOOL_PROGRAMS:
            bundle.add_program(archive, tools, program)
        step("writing guest-generic's initramfs-tools.cpio.gz")
        write_atomic(out / "initramfs-tools.cpio.gz", archive.to_gzip())
        write_manifest(
            root / MANIFEST,
            {
                "vmlinux": f"guest-generic/{version}/vmlinux",
                "initramfs": f"guest-generic/{version}/initramfs-tools.cpio.gz",
                "kernel_version": version,
                "recipe": recipe(),
            },
        )
    return generic_guest(root)


__all__ = ["GenericGuest", "build_generic_guest", "generic_guest"]
