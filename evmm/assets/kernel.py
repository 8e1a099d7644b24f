"""The uncompressed ELF ``vmlinux`` inside a bzImage (Linux boot protocol, Documentation/arch/x86/boot.rst).

A vmlinux boots through its PVH entry note and skips the in-guest decompressor, which under emulation takes as
long as the rest of the boot.  Since protocol 2.08 the setup header says where the compressed payload lies
(``payload_offset`` from the start of the protected-mode code, ``payload_length``), and the payload's magic says
how it is compressed.
"""

from __future__ import annotations

import lzma
import struct
import subprocess
import zlib

from evmm.assets.debian import require_tool
from evmm.errors import BootError
from evmm.record import record

_HDRS = b"HdrS"
_ELF = b"\x7fELF"

# Magic numbers of the compressors Linux can use for its payload (scripts/Makefile.lib).
_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),  # the LZ4 *legacy* frame format (lz4 -l)
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
)


@record(frozen=True)
class SetupHeader:
    setup_sects: int
    version: int  # boot protocol, e.g. 0x020f
    payload_offset: int  # from the start of the protected-mode code
    payload_length: int

    @property
    def protected_mode_offset(self) -> int:
        # setup_sects == 0 means 4 (boot.rst: "for backwards compatibility"); the boot sector adds one.
        return ((self.setup_sects or 4) + 1) * 512


def parse_setup_header(image: bytes, name: str) -> SetupHeader:
    if len(image) < 0x250 or image[0x202:0x206] != _HDRS:
        raise BootError(f"{name}: not a bzImage (no 'HdrS' setup header at 0x202)")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x0208:
        raise BootError(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} has no payload fields (need 2.08+)"
        )
    offset, length = struct.unpack_from("<II", image, 0x248)
    header = SetupHeader(image[0x1F1], version, offset, length)
    if header.protected_mode_offset + offset + length > len(image) or length == 0:
        raise BootError(f"{name}: payload ({offset}+{length}) lies outside the {len(image)}-byte image")
    return header


def payload(image: bytes, name: str) -> bytes:
    h = parse_setup_header(image, name)
    start = h.protected_mode_offset + h.payload_offset
    return image[start : start + h.payload_length]


def compression(data: bytes) -> str:
    for magic, kind in _MAGICS:
        if data.startswith(magic):
            return kind
    return "unknown"


def _lz4_legacy(data: bytes, name: str) -> bytes:
    # Debian's lz4 tool rather than a pure-Python decoder: decoding a 50 MB kernel token by token in Python takes
    # tens of seconds, the tool takes a fraction of one.  The kernel's build appends the uncompressed size as 4
    # little-endian bytes after the frame (scripts/Makefile.lib size_append); the tool would read them as a block
    # header, so they are cut off and used to check the result instead.
    expected = struct.unpack("<I", data[-4:])[0]
    r = subprocess.run(
        [require_tool("lz4", "lz4"), "-d", "-c"], input=data[:-4], capture_output=True, check=False
    )
    if r.returncode != 0 or len(r.stdout) != expected:
        why = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or [
            f"{len(r.stdout)} of {expected} bytes"
        ]
        raise BootError(f"{name}: LZ4 payload does not decompress: {why[0]}")
    return r.stdout


def decompress(data: bytes, name: str) -> bytes:
    kind = compression(data)
    try:
        if kind == "xz":
            # The payload is followed by the appended size; the decompressor stops at the end of the stream.
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "gzip":
            return zlib.decompressobj(wbits=31).decompress(data)  # 31: gzip framing; ignores the size trailer
    except (lzma.LZMAError, zlib.error) as e:
        raise BootError(f"{name}: {kind} payload does not decompress: {e}") from e
    if kind == "lz4":
        return _lz4_legacy(data, name)
    raise BootError(
        f"{name}: payload compressed with {kind}, which evmm cannot unpack (xz, lz4 and gzip work)"
    )


def extract_vmlinux(image: bytes, name: str) -> bytes:
    """The ELF vmlinux carried by the bzImage ``image`` (``name`` is used in error messages)."""
    elf = decompress(payload(image, name), name)
    if not elf.startswith(_ELF):
        raise BootError(f"{name}: the decompressed payload is not an ELF file")
    return elf
