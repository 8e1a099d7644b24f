"""vmlinux extraction from a bzImage: setup header parsing and payload decompression (boot.rst)."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess

import pytest

from evmm.assets.kernel import compression, extract_vmlinux, parse_setup_header, payload
from evmm.errors import BootError

ELF = b"\x7fELF" + b"\x02\x01\x01" + bytes(57) + b"kernel text" * 100


def bzimage(compressed: bytes, setup_sects: int = 3, version: int = 0x020F) -> bytes:
    """A minimal bzImage: boot sector + setup sectors, then the protected-mode part holding the payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    pm = b"\x90" * 64 + compressed + struct.pack("<I", len(ELF))  # the build appends the uncompressed size
    struct.pack_into("<II", setup, 0x248, 64, len(compressed) + 4)
    return bytes(setup) + pm


def test_setup_header_fields() -> None:
    h = parse_setup_header(bzimage(b"x" * 10, setup_sects=5), "k")
    assert (h.setup_sects, h.version, h.payload_offset, h.payload_length) == (5, 0x020F, 64, 14)
    assert h.protected_mode_offset == 6 * 512


def test_zero_setup_sects_means_four() -> None:
    image = bytearray(bzimage(b"x" * 10, setup_sects=4))
    image[0x1F1] = 0
    assert parse_setup_header(bytes(image), "k").protected_mode_offset == 5 * 512


def test_xz_payload_is_extracted() -> None:
    xz = lzma.compress(ELF, format=lzma.FORMAT_XZ)
    image = bzimage(xz)
    assert compression(payload(image, "k")) == "xz"
    assert extract_vmlinux(image, "k") == ELF


@pytest.mark.skipif(shutil.which("lz4") is None, reason="Debian's lz4 is not installed")
def test_lz4_legacy_payload_is_extracted() -> None:
    lz4 = subprocess.run(["lz4", "-l", "-9", "-c"], input=ELF, capture_output=True, check=True).stdout
    image = bzimage(lz4)
    assert compression(payload(image, "k")) == "lz4"
    assert extract_vmlinux(image, "k") == ELF


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"MZ" + bytes(0x300), "not a bzImage"),
        (bzimage(b"x", version=0x0206), "boot protocol 2.06 has no payload fields"),
        (bzimage(b"BZh91AY" + bytes(20)), "compressed with bzip2"),
        (bzimage(lzma.compress(b"not an elf" * 10, format=lzma.FORMAT_XZ)), "not an ELF"),
        (bzimage(b"\xfd7zXZ\x00" + bytes(40)), "xz payload does not decompress"),
    ],
)
def test_bad_images_get_one_line_naming_the_file(image: bytes, message: str) -> None:
    with pytest.raises(BootError, match=message) as e:
        extract_vmlinux(image, "vmlinuz-test")
    assert str(e.value).startswith("vmlinuz-test: ") and "\n" not in str(e.value)


def test_payload_outside_the_image_is_refused() -> None:
    image = bytearray(bzimage(b"x" * 10))
    struct.pack_into("<II", image, 0x248, 64, 1 << 20)
    with pytest.raises(BootError, match="outside"):
        payload(bytes(image), "k")
