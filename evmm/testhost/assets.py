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
# Loaded only when first used (bundle.add_modprobe_modules): what container engines ask of a host's kernel.
# overlay: their image storage; br_netfilter: docker's bridge filtering; the netfilter modules below: their
# NAT and filter rules (Debian's iptables is iptables-nft, plus the legacy tables' modules); sch_ingress,
# cls_u32, cls_matchall, act_mirred: the tc redirect between a container's veth and evmm-oci's tap (as Kata's
# tcfilter); fuse: fuse-overlayfs; crc32c_generic: libcrc32c (nf_nat's) asks the crypto API for crc32c
# when it loads, which modules.dep does not say (a softdep).
ENGINE_MODULES = (
    "overlay",
    "crc32c_generic",
    "br_netfilter",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_nat",
    "nft_masq",
    "nft_redir",
    "nft_ct",
    "nft_reject_inet",
    "nft_fib_inet",
    "xt_conntrack",
    "xt_addrtype",
    "xt_MASQUERADE",
    "xt_REDIRECT",
    "xt_nat",
    "xt_tcpudp",
    "xt_comment",
    "xt_mark",
    "xt_multiport",
    "iptable_filter",
    "iptable_nat",
    "ip6table_filter",
    "ip6table_nat",
    "sch_ingress",
    "cls_u32",
    "cls_matchall",
    "act_mirred",
    "fuse",
)
MANIFEST = "testhost.json"


def recipe_id() -> str:
    """A digest of what goes into the initramfs besides Debian's packages: a changed init or module list
    makes ``build_testhost_assets`` rebuild a cache built by an older evmm."""
    h = hashlib.sha256(resources.files("evmm.testhost").joinpath("init").read_bytes())
    h.update(repr((MODULES, ENGINE_MODULES)).encode())
    return h.hexdigest()[:16]


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
        bundle.add_modprobe_modules(archive, kroot, version, ENGINE_MODULES)
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
