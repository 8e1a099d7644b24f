"""The test host's kernel and initramfs, built from Debian packages into the evmm cache.

The kernel is Debian's *generic* one (the cloud kernel lacks kvm-amd and 9p), booted as its extracted ELF
vmlinux (PVH entry), which under TCG reaches /init about twice as soon as the bzImage.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from evmm.assets import bundle
from evmm.assets.cache import cache_root, read_manifest, write_atomic, write_manifest
from evmm.assets.initramfs import Archive
from evmm.assets.kernel import extract_vmlinux
from evmm.assets.workspace import Step, Workspace, no_progress
from evmm.errors import EvmmError
from evmm.record import record

KERNEL_METAPACKAGE = "linux-image-amd64"
KERNEL_PREFIX = "linux-image-"
# virtio_pci + 9p: the host shares; kvm_amd: TCG emulates AMD SVM (not VMX); virtio_rng: entropy for Python
# and friends; tun, veth, bridge, vhost_vsock, vhost_net: what the virtio-net and vsock tests set up inside.
MODULES = (
    "virtio_pci",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "kvm",
    "kvm_amd",
    "tun",
    "veth",
    "bridge",
    "vhost_vsock",
    "vhost_net",
)
MANIFEST = "testhost.json"


@record(frozen=True)
class TesthostAssets:
    kernel: Path  # ELF vmlinux of Debian's generic kernel
    initramfs: Path
    kernel_version: str


def testhost_assets(cache: Path | None = None) -> TesthostAssets:
    root = cache_root(cache)
    manifest = read_manifest(root / MANIFEST)
    if manifest and {"kernel", "initramfs", "kernel_version"} <= manifest.keys():
        assets = TesthostAssets(
            root / manifest["kernel"], root / manifest["initramfs"], manifest["kernel_version"]
        )
        if assets.kernel.is_file() and assets.initramfs.is_file():
            return assets
    raise EvmmError(f"no KVM test host kernel in {root}: run `evmm assets` first")


def recipe_id() -> str:
    """A digest of the test host's init: a changed init makes ``build_testhost_assets`` rebuild its image."""
    init = resources.files("evmm.testhost").joinpath("init").read_bytes()
    return hashlib.sha256(init + repr(MODULES).encode()).hexdigest()[:16]


def build_testhost_assets(
    cache: Path | None = None, *, force: bool = False, step: Step = no_progress
) -> TesthostAssets:
    root = cache_root(cache)
    if not force:
        try:
            found = testhost_assets(root)
        except EvmmError:
            pass
        else:
            if (read_manifest(root / MANIFEST) or {}).get("recipe") == recipe_id():
                return found
    with Workspace(root, step, refresh=force) as ws:
        kroot, version = ws.fetch_kernel(KERNEL_METAPACKAGE, KERNEL_PREFIX)
        busybox = ws.fetch_busybox()
        out = root / "testhost" / version
        step(f"extracting vmlinux from vmlinuz-{version}")
        bzimage = (kroot / "boot" / f"vmlinuz-{version}").read_bytes()
        write_atomic(out / "vmlinux", extract_vmlinux(bzimage, f"vmlinuz-{version}"))
        step("writing the test host's initramfs.cpio.gz")
        archive = Archive()
        bundle.base_layout(archive)
        bundle.add_busybox(archive, busybox)
        bundle.add_modules(archive, kroot, version, MODULES)
        archive.file("init", resources.files("evmm.testhost").joinpath("init").read_bytes(), 0o755)
        write_atomic(out / "initramfs.cpio.gz", archive.to_gzip())
        write_manifest(
            root / MANIFEST,
            {
                "kernel": f"testhost/{version}/vmlinux",
                "initramfs": f"testhost/{version}/initramfs.cpio.gz",
                "kernel_version": version,
                "recipe": recipe_id(),
            },
        )
    return testhost_assets(root)
