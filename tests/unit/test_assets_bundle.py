"""Bundling a dynamically linked program: DT_NEEDED/RUNPATH parsing and library resolution in an unpacked tree."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from evmm.assets.bundle import add_modprobe_modules, add_modules, add_program, resolve_in
from evmm.assets.elf import dynamic_info
from evmm.assets.initramfs import Archive, read_cpio
from evmm.errors import EvmmError

needs_ldd_tree = pytest.mark.skipif(
    not Path("/lib64/ld-linux-x86-64.so.2").exists(), reason="not an x86-64 glibc host"
)


def test_dynamic_info_of_the_running_python() -> None:
    info = dynamic_info(Path(sys.executable).resolve().read_bytes(), sys.executable)
    assert info.interpreter is not None and info.interpreter.startswith("/lib")
    assert "libc.so.6" in info.needed or any(n.startswith("libpython") for n in info.needed)


def test_not_an_elf_is_refused() -> None:
    with pytest.raises(EvmmError, match="not a little-endian ELF64"):
        dynamic_info(b"#!/bin/sh\n" + bytes(100), "script")


def test_symlinks_resolve_inside_the_tree(tmp_path: Path) -> None:
    (tmp_path / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib/x86_64-linux-gnu/libz.so.1.2.13").write_bytes(b"z")
    (tmp_path / "lib/x86_64-linux-gnu/libz.so.1").symlink_to("libz.so.1.2.13")
    (tmp_path / "lib64").symlink_to("/lib/x86_64-linux-gnu")  # absolute: means the tree's /lib/...
    assert resolve_in(tmp_path, "/lib64/libz.so.1") == tmp_path / "lib/x86_64-linux-gnu/libz.so.1.2.13"


@needs_ldd_tree
def test_program_with_its_libraries_from_a_tree(tmp_path: Path) -> None:
    """Copy the host's /bin/true and the libraries it names into a fake unpacked tree, then bundle it."""
    true = Path(shutil.which("true") or "/bin/true").resolve()
    info = dynamic_info(true.read_bytes(), str(true))
    (tmp_path / "usr/bin").mkdir(parents=True)
    shutil.copy(true, tmp_path / "usr/bin/true")
    libdir = tmp_path / "lib/x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    for soname in info.needed:
        shutil.copy(Path("/lib/x86_64-linux-gnu", soname).resolve(), libdir / soname)
    assert info.interpreter is not None
    interp = tmp_path / info.interpreter.lstrip("/")
    interp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(info.interpreter).resolve(), interp)

    archive = Archive()
    bundled = add_program(archive, tmp_path, "/usr/bin/true")
    paths = {e.path for e in read_cpio(archive.to_cpio())}
    assert "usr/bin/true" in paths
    assert info.interpreter.lstrip("/") in paths
    assert set(info.needed) <= set(bundled)
    assert {f"lib/x86_64-linux-gnu/{s}" for s in info.needed} <= paths


@needs_ldd_tree
def test_a_missing_library_is_named(tmp_path: Path) -> None:
    true = Path(shutil.which("true") or "/bin/true").resolve()
    (tmp_path / "usr/bin").mkdir(parents=True)
    shutil.copy(true, tmp_path / "usr/bin/true")
    with pytest.raises(EvmmError, match=r"needs lib\S+, which no unpacked package provides"):
        add_program(Archive(), tmp_path, "/usr/bin/true")


def test_modules_and_load_list(tmp_path: Path) -> None:
    mdir = tmp_path / "lib/modules/6.1.0-test"
    (mdir / "kernel/drivers/virtio").mkdir(parents=True)
    for name in ("virtio_ring", "virtio", "virtio_mmio"):
        (mdir / f"kernel/drivers/virtio/{name}.ko").write_bytes(name.encode())
    (mdir / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
    )
    archive = Archive()
    assert add_modules(archive, tmp_path, "6.1.0-test", ["virtio_mmio"]) == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
    ]
    files = {e.path: e.data for e in read_cpio(archive.to_cpio())}
    assert files["etc/evmm/modules.load"] == (
        b"virtio_ring kernel/drivers/virtio/virtio_ring.ko\n"
        b"virtio kernel/drivers/virtio/virtio.ko\n"
        b"virtio_mmio kernel/drivers/virtio/virtio_mmio.ko\n"
    )
    assert files["lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko"] == b"virtio"


@pytest.mark.skipif(shutil.which("depmod") is None, reason="needs kmod's depmod")
def test_modules_left_to_modprobe_are_indexed_but_not_loaded(tmp_path: Path) -> None:
    """On-demand modules join the archive and depmod's indexes (busybox modprobe reads modules.dep, kmod the
    .bin files), together with the modules loaded at boot, and stay out of the boot's load list."""
    mdir = tmp_path / "lib/modules/6.1.0-test"
    (mdir / "kernel/net").mkdir(parents=True)
    for name in ("virtio", "x_tables", "xt_nat"):
        (mdir / f"kernel/net/{name}.ko").write_bytes(name.encode())
    (mdir / "modules.dep").write_text(
        "kernel/net/virtio.ko:\nkernel/net/x_tables.ko:\nkernel/net/xt_nat.ko: kernel/net/x_tables.ko\n"
    )
    (mdir / "modules.builtin").write_text("")
    archive = Archive()
    add_modules(archive, tmp_path, "6.1.0-test", ["virtio"])
    assert add_modprobe_modules(archive, tmp_path, "6.1.0-test", ["xt_nat"]) == ["x_tables", "xt_nat"]
    files = {e.path: e.data for e in read_cpio(archive.to_cpio())}
    assert files["etc/evmm/modules.load"] == b"virtio kernel/net/virtio.ko\n"
    assert files["lib/modules/6.1.0-test/kernel/net/xt_nat.ko"] == b"xt_nat"
    indexed = files["lib/modules/6.1.0-test/modules.dep"].decode()
    assert {ln.split(":")[0] for ln in indexed.splitlines()} == {
        f"kernel/net/{n}.ko" for n in ("virtio", "x_tables", "xt_nat")
    }
    assert "lib/modules/6.1.0-test/modules.dep.bin" in files


def test_modules_without_depmod_get_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "lib/modules/6.1.0-test").mkdir(parents=True)
    with pytest.raises(EvmmError, match="was depmod run"):
        add_modules(Archive(), tmp_path, "6.1.0-test", ["virtio_mmio"])
