"""The boot protocol's structures, byte for byte (Documentation/arch/x86/boot.rst, zero-page.rst)."""

from __future__ import annotations

import struct

import pytest

from evmm.arch.x86 import layout
from evmm.arch.x86.bootparams import (
    E820Entry,
    E820Type,
    ZeroPageParams,
    build_zero_page,
    parse_setup_header,
)
from evmm.arch.x86.e820 import e820_map
from evmm.errors import BootError


def fake_bzimage(
    *,
    version: int = 0x020F,
    xloadflags: int = 0x1,
    setup_sects: int = 27,
    payload: bytes = b"\x90" * 4096,
    cmdline_size: int = 2047,
) -> bytes:
    """A bzImage with a real-looking setup header and a dummy protected-mode payload."""
    img = bytearray(((setup_sects or 4) + 1) * 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    struct.pack_into("<I", img, 0x202, 0x53726448)  # "HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)  # kernel_alignment
    img[0x234] = 1  # relocatable
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, cmdline_size)
    struct.pack_into("<Q", img, 0x258, 0x1000000)  # pref_address
    struct.pack_into("<I", img, 0x260, 0x2000000)  # init_size
    return bytes(img) + payload


def test_setup_header_fields_are_read_from_their_documented_offsets() -> None:
    hdr = parse_setup_header(fake_bzimage())
    assert hdr.version == 0x020F
    assert hdr.setup_sects == 27
    assert hdr.setup_size == 28 * 512
    assert hdr.initrd_addr_max == 0x7FFFFFFF
    assert hdr.kernel_alignment == 0x200000
    assert hdr.relocatable
    assert hdr.cmdline_size == 2047
    assert hdr.pref_address == 0x1000000
    assert hdr.init_size == 0x2000000


def test_zero_setup_sects_means_four() -> None:
    assert parse_setup_header(fake_bzimage(setup_sects=0)).setup_sects == 4


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\0" * 100, "too small"),
        (b"\0" * 8192, "not a Linux bzImage"),
        (fake_bzimage(version=0x0206), "boot protocol 2.6 is too old"),
        (fake_bzimage(xloadflags=0), "not a 64-bit kernel"),
        (fake_bzimage()[:1000], "file is shorter"),
    ],
    ids=["tiny", "no-header", "old-protocol", "32-bit", "truncated"],
)
def test_bad_kernels_get_one_line_errors_naming_the_file(image: bytes, message: str) -> None:
    with pytest.raises(BootError, match=message) as err:
        parse_setup_header(image, "/boot/k")
    assert str(err.value).startswith("/boot/k: ")
    assert "\n" not in str(err.value)


def test_zero_page_carries_the_loader_fields() -> None:
    hdr = parse_setup_header(fake_bzimage())
    e820 = (E820Entry(0, 0x9FC00, E820Type.RAM), E820Entry(0x100000, 0x7F00000, E820Type.RAM))
    page = build_zero_page(ZeroPageParams(0x20000, e820, 0x7000000, 0x123456, 0xE0000), hdr)
    assert len(page) == 4096
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55  # header copied from the image
    assert struct.unpack_from("<I", page, 0x202)[0] == 0x53726448
    assert page[0x210] == 0xFF  # type_of_loader: undefined
    assert page[0x211] & 0x80  # CAN_USE_HEAP
    assert page[0x211] & 0x01  # LOADED_HIGH kept
    assert struct.unpack_from("<H", page, 0x224)[0] == 0xFE00  # heap_end_ptr
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000  # cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x218)[0] == 0x7000000  # ramdisk_image
    assert struct.unpack_from("<I", page, 0x21C)[0] == 0x123456  # ramdisk_size
    assert struct.unpack_from("<I", page, 0x23C)[0] == 0  # hardware_subarch: PC
    assert struct.unpack_from("<Q", page, 0x070)[0] == 0xE0000  # acpi_rsdp_addr
    assert struct.unpack_from("<H", page, 0x1FA)[0] == 0xFFFF  # vid_mode: normal
    assert page[0x1E8] == 2  # e820_entries
    assert struct.unpack_from("<QQI", page, 0x2D0) == (0, 0x9FC00, 1)
    assert struct.unpack_from("<QQI", page, 0x2D0 + 20) == (0x100000, 0x7F00000, 1)


def test_zero_page_for_an_elf_kernel_has_the_signature_fields() -> None:
    page = build_zero_page(ZeroPageParams(0x20000, (), 0, 0, 0))
    assert struct.unpack_from("<H", page, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<I", page, 0x202)[0] == 0x53726448
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x20000


def test_zero_page_puts_64_bit_halves_in_the_ext_fields() -> None:
    page = build_zero_page(ZeroPageParams(0x1_2345_6000, (), 0x2_0000_1000, 0x1_0000_0000, 0))
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x2345_6000
    assert struct.unpack_from("<I", page, 0x0C8)[0] == 0x1  # ext_cmd_line_ptr
    assert struct.unpack_from("<I", page, 0x0C0)[0] == 0x2  # ext_ramdisk_image
    assert struct.unpack_from("<I", page, 0x0C4)[0] == 0x1  # ext_ramdisk_size


def test_e820_for_a_small_guest() -> None:
    m = e820_map(256 << 20)
    assert [(e.addr, e.size, e.type) for e in m] == [
        (0, 0x9FC00, E820Type.RAM),
        (0x9FC00, 0x100000 - 0x9FC00, E820Type.RESERVED),
        (0x100000, (256 << 20) - 0x100000, E820Type.RAM),
        (0xC000_0000, 0x4000_0000, E820Type.RESERVED),
    ]


def test_e820_splits_ram_around_the_32_bit_hole() -> None:
    m = e820_map(4 << 30)
    ram = [(e.addr, e.size) for e in m if e.type == E820Type.RAM]
    assert ram == [(0, 0x9FC00), (0x100000, 0xC000_0000 - 0x100000), (1 << 32, 1 << 30)]
    assert sum(size for _, size in ram) == (4 << 30) - 0x100000 + 0x9FC00
    assert layout.ram_layout(4 << 30) == [(0, 0xC000_0000), (1 << 32, 1 << 30)]
