"""The Linux/x86 boot protocol's data: the setup header and the zero page (``struct boot_params``).

Offsets are those of Documentation/arch/x86/boot.rst ("The real-mode kernel header") and zero-page.rst, and
arch/x86/include/uapi/asm/bootparam.h.  Everything here is pure: bytes in, bytes out.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from evmm.errors import BootError
from evmm.record import record

ZERO_PAGE_SIZE = 4096
SETUP_HEADER_OFFSET = 0x1F1  # the header lives at this offset in both the bzImage and the zero page
HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG = 0xAA55

# Zero-page offsets (zero-page.rst).
ZP_ACPI_RSDP_ADDR = 0x070
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_E820_ENTRIES = 0x1E8
ZP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128

# Setup-header fields we read or write: (offset, struct format).  boot.rst, "The real-mode kernel header".
_HDR = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "vid_mode": (0x1FA, "H"),
    "boot_flag": (0x1FE, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "ext_loader_ver": (0x226, "B"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "hardware_subarch": (0x23C, "I"),
    "payload_offset": (0x248, "I"),
    "payload_length": (0x24C, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}

LOADFLAG_LOADED_HIGH = 0x01
LOADFLAG_KEEP_SEGMENTS = 0x40
LOADFLAG_CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01  # has the 64-bit entry point at load address + 0x200
TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst: "0xFF: undefined" - for loaders without an assigned ID
HARDWARE_SUBARCH_PC = 0
MIN_PROTOCOL_64BIT = 0x020C  # xloadflags (and so XLF_KERNEL_64) appear in protocol 2.12
ENTRY_64_OFFSET = 0x200


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@record(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    def pack(self) -> bytes:
        return struct.pack("<QQI", self.addr, self.size, int(self.type))


@record(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that a 64-bit boot needs."""

    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    raw: bytes  # the header bytes from 0x1F1 up to the end of the first sector's setup area

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode setup code (boot sector included) before the protected-mode kernel."""
        return (self.setup_sects + 1) * 512


def _get(buf: bytes | memoryview, name: str) -> int:
    off, fmt = _HDR[name]
    return int(struct.unpack_from("<" + fmt, buf, off)[0])


def parse_setup_header(image: bytes | memoryview, name: str = "kernel") -> SetupHeader:
    """Validate and parse a bzImage's setup header; ``name`` (the path) goes into every error."""
    if len(image) < 0x268:
        raise BootError(f"{name}: too small to be a Linux kernel ({len(image)} bytes)")
    if _get(image, "boot_flag") != BOOT_FLAG or _get(image, "header") != HDRS_MAGIC:
        raise BootError(f"{name}: not a Linux bzImage (no 'HdrS' setup header) and not an ELF vmlinux")
    version = _get(image, "version")
    if version < MIN_PROTOCOL_64BIT:
        raise BootError(
            f"{name}: boot protocol {version >> 8}.{version & 0xFF} is too old; evmm needs 2.12+ (Linux 3.8+)"
        )
    xloadflags = _get(image, "xloadflags")
    if not xloadflags & XLF_KERNEL_64:
        raise BootError(f"{name}: not a 64-bit kernel (XLF_KERNEL_64 unset); evmm boots x86_64 kernels only")
    setup_sects = _get(image, "setup_sects") or 4  # boot.rst: "if this field is 0, the real value is 4"
    hdr = SetupHeader(
        setup_sects=setup_sects,
        version=version,
        loadflags=_get(image, "loadflags"),
        initrd_addr_max=_get(image, "initrd_addr_max"),
        kernel_alignment=_get(image, "kernel_alignment"),
        relocatable=bool(_get(image, "relocatable_kernel")),
        xloadflags=xloadflags,
        cmdline_size=_get(image, "cmdline_size"),
        payload_offset=_get(image, "payload_offset"),
        payload_length=_get(image, "payload_length"),
        pref_address=_get(image, "pref_address"),
        init_size=_get(image, "init_size"),
        raw=bytes(image[SETUP_HEADER_OFFSET : min(len(image), 0x290)]),
    )
    if hdr.setup_size >= len(image):
        raise BootError(f"{name}: setup header claims {setup_sects} setup sectors but the file is shorter")
    return hdr


def _put(page: bytearray, name: str, value: int) -> None:
    off, fmt = _HDR[name]
    struct.pack_into("<" + fmt, page, off, value)


@record(frozen=True)
class ZeroPageParams:
    cmdline_addr: int
    e820: tuple[E820Entry, ...]
    initrd_addr: int = 0
    initrd_size: int = 0
    rsdp_addr: int = 0


def build_zero_page(params: ZeroPageParams, header: SetupHeader | None = None) -> bytes:
    """The 4 KiB ``struct boot_params`` a 64-bit boot hands the kernel in RSI.

    With a bzImage the kernel's own setup header is copied in first (boot.rst, "64-bit boot protocol": the
    loader fills the zero page "with the setup header from the kernel image"), then the loader's fields.
    """
    if len(params.e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"too many e820 entries ({len(params.e820)} > {E820_MAX_ENTRIES_ZEROPAGE})")
    page = bytearray(ZERO_PAGE_SIZE)
    if header is not None:
        page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header.raw)] = header.raw
        _put(page, "loadflags", (header.loadflags | LOADFLAG_CAN_USE_HEAP) & ~LOADFLAG_KEEP_SEGMENTS)
    else:
        # An ELF vmlinux has no header of its own: write the fields the kernel checks.
        _put(page, "boot_flag", BOOT_FLAG)
        _put(page, "header", HDRS_MAGIC)
        _put(page, "version", MIN_PROTOCOL_64BIT)
        _put(page, "loadflags", LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP)
        _put(page, "kernel_alignment", 0x1000000)
    _put(page, "vid_mode", 0xFFFF)  # "normal": no mode change
    _put(page, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    _put(page, "heap_end_ptr", 0xFE00)  # boot.rst: heap end relative to the setup segment
    _put(page, "hardware_subarch", HARDWARE_SUBARCH_PC)
    _put(page, "cmd_line_ptr", params.cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, ZP_EXT_CMD_LINE_PTR, params.cmdline_addr >> 32)
    _put(page, "ramdisk_image", params.initrd_addr & 0xFFFFFFFF)
    _put(page, "ramdisk_size", params.initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", page, ZP_EXT_RAMDISK_IMAGE, params.initrd_addr >> 32)
    struct.pack_into("<I", page, ZP_EXT_RAMDISK_SIZE, params.initrd_size >> 32)
    struct.pack_into("<Q", page, ZP_ACPI_RSDP_ADDR, params.rsdp_addr)
    page[ZP_E820_ENTRIES] = len(params.e820)
    for i, entry in enumerate(params.e820):
        page[ZP_E820_TABLE + 20 * i : ZP_E820_TABLE + 20 * (i + 1)] = entry.pack()
    return bytes(page)
