"""evmm's default guest: Debian's cloud kernel and a busybox initramfs with the virtio modules.

Layout in the cache (see ``cache_root``): ``guest/VERSION/{vmlinuz,vmlinux,initramfs.cpio.gz,
initramfs-tools.cpio.gz}`` and ``guest.json``, the manifest written last that marks the build complete.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from evmm import agent
from evmm.assets import bundle, debian
from evmm.assets.cache import cache_root, read_manifest, write_atomic, write_manifest
from evmm.assets.cc import compile_c
from evmm.assets.initramfs import Archive
from evmm.assets.kernel import extract_vmlinux
from evmm.assets.workspace import Step, Workspace, no_progress
from evmm.errors import EvmmError
from evmm.record import record

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
KERNEL_PREFIX = "linux-image-"
MODULES = (
    "virtio_mmio",
    "virtio_pci",  # the standard board's transport (with virtio_pci_modern_dev, from modules.dep)
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    # virtio-fs (--fs): virtiofs.ko needs fuse.ko; the load order comes from modules.dep.
    "fuse",
    "virtiofs",
    # The ACPI power button (the GED's Notify on PNP0C0C) reaches user space as an input event; busybox acpid
    # turns it into poweroff.  This is how `evmm ctl SOCK shutdown` and QMP system_powerdown stop the guest.
    "button",
    "evdev",
)
# Programs of the tools variant, for virtio tests: fio (block), iperf3 (net), socat (AF_VSOCK streams),
# stress-ng (its filesystem stressors on a virtio-fs mount), and qemu-guest-agent for the benchmark's exec
# row under QEMU (/init starts it when QEMU gave it its port).
TOOL_PACKAGES = ("fio", "iperf3", "socat", "stress-ng", "qemu-guest-agent")
TOOL_PROGRAMS = (
    "/usr/bin/fio",
    "/usr/bin/iperf3",
    "/usr/bin/socat",
    "/usr/bin/stress-ng",
    "/usr/sbin/qemu-ga",
)
MANIFEST = "guest.json"
TOOLS_INITRAMFS = "initramfs-tools.cpio.gz"
# Static programs of evmm's own in the tools initramfs, each from one C source in evmm/assets: the linux
# tier's hostile virtio driver (tests/linux/test_confine.py) and the bench's MMIO exit timer (seccomp row).
STATIC_PROGRAMS = {"evmm-hostile": "hostile.c", "evmm-mmio-reads": "mmio_reads.c"}
READY_LINE = "evmm-guest: ready"
BOOT_MARKER_ADDRESS = 0xFEB01000
BOOT_MARKER_VALUE = 123

POWER_BUTTON_ACTION = b"#!/bin/sh\nexec /sbin/poweroff\n"
PROFILE = b"""# /etc/profile of evmm's default guest, read by the login shell on the console.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
export PS1='evmm:\\w# '
cd /root
"""


@record(frozen=True)
class GuestAssets:
    bzimage: Path  # the cloud kernel as Debian ships it (LZ4 bzImage)
    vmlinux: Path  # the same kernel's uncompressed ELF, booted through its PVH entry
    initramfs: Path  # gzip cpio: busybox-static, virtio modules, /init
    kernel_version: str
    # initramfs plus fio, iperf3, socat and their libraries: check is_file(), `evmm assets --no-tools` skips it
    tools_initramfs: Path


def _assets(root: Path, manifest: dict[str, str]) -> GuestAssets:
    return GuestAssets(
        bzimage=root / manifest["bzimage"],
        vmlinux=root / manifest["vmlinux"],
        initramfs=root / manifest["initramfs"],
        kernel_version=manifest["kernel_version"],
        tools_initramfs=root / "guest" / manifest["kernel_version"] / TOOLS_INITRAMFS,
    )


def default_guest(cache: Path | None = None) -> GuestAssets:
    """The cached default guest, or an ``EvmmError`` telling the user to build it."""
    root = cache_root(cache)
    manifest = read_manifest(root / MANIFEST)
    try:
        assets = _assets(root, manifest) if manifest else None
    except KeyError:
        assets = None
    if assets is None or not all(p.is_file() for p in (assets.bzimage, assets.vmlinux, assets.initramfs)):
        raise EvmmError("no default guest: run `evmm assets` first")
    return assets


def recipe_id() -> str:
    """A digest of what goes into the initramfs besides Debian's packages: a changed init or module list
    makes ``build_default_guest`` rebuild a cache built by an older evmm."""
    files = resources.files("evmm.assets")
    h = hashlib.sha256()
    for part in (
        files.joinpath("init").read_bytes(),
        files.joinpath("inittab").read_bytes(),
        PROFILE,
        POWER_BUTTON_ACTION,
    ):
        h.update(part)
    h.update(repr((MODULES, TOOL_PACKAGES, TOOL_PROGRAMS)).encode())
    for source in STATIC_PROGRAMS.values():
        h.update(files.joinpath(source).read_bytes())
    h.update(agent.digest("guest").encode())
    return h.hexdigest()[:16]


def build_static(name: str) -> bytes:
    """One of STATIC_PROGRAMS, built with the host's gcc for the tools initramfs."""
    source_name = STATIC_PROGRAMS[name]
    source = resources.files("evmm.assets").joinpath(source_name).read_bytes()
    return compile_c(name, {source_name: source}, [source_name], ["-static", "-O2"])


def _init_files(archive: Archive, agent_binary: Path) -> None:
    files = resources.files("evmm.assets")
    # The guest agent (docs/agent-protocol.md), started and respawned by /etc/inittab.
    archive.file(agent.GUEST_PATH, agent_binary.read_bytes(), 0o755)
    archive.file("init", files.joinpath("init").read_bytes(), 0o755)
    archive.file("etc/inittab", files.joinpath("inittab").read_bytes())
    archive.file("etc/profile", PROFILE)
    archive.file("etc/hostname", b"evmm\n")
    # busybox acpid runs /etc/acpi/<event>/<code> for an event: PWRF/00000080 is the power button.
    archive.file("etc/acpi/PWRF/00000080", POWER_BUTTON_ACTION, 0o755)
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.file("etc/group", b"root:x:0:\ntty:x:5:\n")


def build_default_guest(
    cache: Path | None = None, *, force: bool = False, tools: bool = True, step: Step = no_progress
) -> GuestAssets:
    """Build (or find already built) the default guest; ``force`` downloads and rebuilds everything."""
    root = cache_root(cache)
    if not force:
        try:
            found = default_guest(root)
        except EvmmError:
            pass
        else:
            fresh = (read_manifest(root / MANIFEST) or {}).get("recipe") == recipe_id()
            if fresh and (not tools or found.tools_initramfs.is_file()):
                return found
    with Workspace(root, step, refresh=force) as ws:
        kroot, version = ws.fetch_kernel(KERNEL_METAPACKAGE, KERNEL_PREFIX)
        busybox = ws.fetch_busybox()
        out = root / "guest" / version
        bzimage = (kroot / "boot" / f"vmlinuz-{version}").read_bytes()
        write_atomic(out / "vmlinuz", bzimage)
        step(f"extracting vmlinux from vmlinuz-{version}")
        write_atomic(out / "vmlinux", extract_vmlinux(bzimage, f"vmlinuz-{version}"))

        step("writing initramfs.cpio.gz")
        archive = Archive()
        bundle.base_layout(archive)
        bundle.add_busybox(archive, busybox)
        bundle.add_modules(archive, kroot, version, MODULES)
        step("building evmm-agent with the host's gcc")
        _init_files(archive, agent.build(root))
        write_atomic(out / "initramfs.cpio.gz", archive.to_gzip())
        manifest = {
            "kernel_version": version,
            "bzimage": f"guest/{version}/vmlinuz",
            "vmlinux": f"guest/{version}/vmlinux",
            "initramfs": f"guest/{version}/initramfs.cpio.gz",
            "recipe": recipe_id(),
        }
        if tools:
            step("resolving the library packages of " + ", ".join(TOOL_PACKAGES))
            tools_root = ws.fetch(debian.library_closure(list(TOOL_PACKAGES)), into="tools")
            step("writing initramfs-tools.cpio.gz")
            for program in TOOL_PROGRAMS:
                bundle.add_program(archive, tools_root, program)
            for name in STATIC_PROGRAMS:
                step(f"building {name} (gcc -static)")
                archive.file(f"usr/bin/{name}", build_static(name), 0o755)
            write_atomic(out / TOOLS_INITRAMFS, archive.to_gzip())
        write_manifest(root / MANIFEST, manifest)
    return default_guest(root)
