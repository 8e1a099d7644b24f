"""Every bad input to ``evmm run`` is one line on stderr naming it, and a non-zero exit, before any KVM."""

from __future__ import annotations

from pathlib import Path

import pytest

from evmm.cli.main import main


def run_line(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["run", *argv])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    """The smallest image the loader accepts as a bzImage: a setup header saying protocol 2.15."""
    image = bytearray(0x1000 * 4)
    image[0x1F1] = 1  # setup_sects
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x020F).to_bytes(2, "little")
    image[0x211] = 0x01  # loadflags: LOADED_HIGH
    image[0x236:0x238] = (0x0001 | 0x0002).to_bytes(2, "little")  # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    path = tmp_path / "vmlinuz"
    path.write_bytes(image)
    return path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--kernel", "/nonexistent/vmlinuz"], "--kernel /nonexistent/vmlinuz: no such file"),
        (["--kernel", "TEXT"], "not a Linux bzImage"),
        (["--memory", "12Q"], "--memory '12Q' is not a size"),
        (["--memory", "1M"], "--memory"),
        (["--cpus", "0"], "--cpus 0 is out of range"),
        (["--cpus", "999"], "--cpus 999 is out of range"),
        (["--cpus", "two"], "--cpus 'two' is not a number"),
        (["--vsock", "cid=3,path=/tmp/v.sock,vhost=on"], "path= and vhost=on exclude each other"),
        (["--vsock", "cid=2,vhost=on"], "--vsock: cid=2 is out of range"),
    ],
)
def test_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], kernel: Path, argv: list[str], expected: str
) -> None:
    if "--kernel" not in argv:
        argv = ["--kernel", str(kernel), *argv]
    if "TEXT" in argv:
        text = kernel.with_name("notes.txt")
        text.write_text("not a kernel\n" * 1000)
        argv = [str(text) if a == "TEXT" else a for a in argv]
    code, err = run_line(capsys, *argv)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("evmm: ") and expected in err, err


def test_a_missing_or_odd_drive_is_named_before_kvm(
    capsys: pytest.CaptureFixture[str], kernel: Path, tmp_path: Path
) -> None:
    for drive, expected in [
        ("path=/nonexistent.img", "drive /nonexistent.img: no such file"),
        (f"path={tmp_path}", "is a directory"),
        ("readonly=on", "path= is required"),
        (f"path={kernel},readonly=maybe", "readonly"),
    ]:
        code, err = run_line(capsys, "--kernel", str(kernel), "--drive", drive)
        assert code != 0
        assert err.count("\n") == 1 and expected in err, (drive, err)


def test_a_kernel_that_is_elf_but_not_x86_64(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    elf = tmp_path / "vmlinux"
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4], header[5] = 2, 1  # ELFCLASS64, little-endian
    header[18:20] = (183).to_bytes(2, "little")  # EM_AARCH64
    elf.write_bytes(bytes(header))
    code, err = run_line(capsys, "--kernel", str(elf))
    assert code != 0 and "not x86_64" in err, err
