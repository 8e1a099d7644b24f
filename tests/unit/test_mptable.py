"""The MP table, read back by offsets from the Intel MultiProcessor Specification 1.4 (§4)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from evmm.arch.x86.layout import EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS, MPTABLE_ADDR
from evmm.arch.x86.mptable import build_mptable
from evmm.errors import ConfigError

pytestmark = pytest.mark.unit

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}  # §4.3: processor entries are 20 bytes, the rest 8


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


@dataclass
class MpTable:
    pointer: bytes
    header: bytes
    entries: list[bytes]


def parse(image: bytes, base: int) -> MpTable:
    pointer = image[:16]
    assert pointer[:4] == b"_MP_"
    assert sum(pointer) % 256 == 0, "floating pointer checksum"
    assert (pointer[8], pointer[9]) == (1, 4)  # length in paragraphs, spec revision 1.4
    config = _u(pointer, 4, 4) - base
    length = _u(image, config + 4, 2)
    table = image[config : config + length]
    assert table[:4] == b"PCMP"
    assert sum(table) % 256 == 0, "configuration table checksum"
    header, pos, entries = table[:44], 44, []
    while pos < length:
        size = ENTRY_SIZES[table[pos]]
        entries.append(table[pos : pos + size])
        pos += size
    assert pos == length
    assert len(entries) == _u(header, 34, 2)
    return MpTable(pointer, header, entries)


def of_type(table: MpTable, kind: int) -> list[bytes]:
    return [e for e in table.entries if e[0] == kind]


@pytest.mark.parametrize("num_cpus", [1, 2, 31, MAX_VCPUS])
def test_structure(num_cpus: int) -> None:
    image = build_mptable(num_cpus)
    mp = parse(image, MPTABLE_ADDR)
    assert _u(mp.pointer, 4, 4) == MPTABLE_ADDR + 16
    assert mp.pointer[11:16] == bytes(5)  # a configuration table is present; virtual wire mode (no IMCR)
    assert len(image) == 16 + _u(mp.header, 4, 2)
    assert mp.header[6] == 4  # spec revision
    assert (mp.header[8:16], mp.header[16:28]) == (b"EVMM    ", b"EVMMVM      ")
    assert _u(mp.header, 36, 4) == LAPIC_ADDR
    assert (_u(mp.header, 28, 4), _u(mp.header, 40, 2)) == (0, 0)  # no OEM table, no extended table
    kinds = [e[0] for e in mp.entries]
    assert kinds == sorted(kinds), "entries must be in type order (§4.3)"


@pytest.mark.parametrize("num_cpus", [1, 4, MAX_VCPUS])
def test_processors(num_cpus: int) -> None:
    cpus = of_type(parse(build_mptable(num_cpus), MPTABLE_ADDR), 0)
    assert [e[1] for e in cpus] == list(range(num_cpus))  # local APIC ids
    assert [e[3] for e in cpus] == [0b11] + [0b01] * (num_cpus - 1)  # enabled; BP on CPU 0 only
    assert {e[2] for e in cpus} == {0x14}


@pytest.mark.parametrize("num_cpus", [1, MAX_VCPUS])
def test_bus_and_ioapic(num_cpus: int) -> None:
    mp = parse(build_mptable(num_cpus), MPTABLE_ADDR)
    assert of_type(mp, 1) == [b"\x01\x00ISA   "]
    (ioapic,) = of_type(mp, 2)
    assert (ioapic[1], ioapic[2], ioapic[3], _u(ioapic, 4, 4)) == (num_cpus, 0x11, 1, IOAPIC_ADDR)


def test_interrupt_assignments() -> None:
    num_cpus = 3
    mp = parse(build_mptable(num_cpus), MPTABLE_ADDR)
    routes = {}
    for e in of_type(mp, 3):
        assert (e[1], _u(e, 2, 2), e[4], e[6]) == (0, 0, 0, num_cpus)  # INT, conforming, ISA bus, the IOAPIC
        assert e[5] not in routes
        routes[e[5]] = e[7]
    # IRQ0 (8254) -> pin 2; no entry for IRQ2 (cascade) nor for pin 0; pins 16-23 for virtio-mmio.
    assert routes == {0: 2, 1: 1, **{irq: irq for irq in range(3, 24)}}
    ext_int, nmi = of_type(mp, 4)
    assert (ext_int[1], _u(ext_int, 2, 2), ext_int[4], ext_int[5], ext_int[6], ext_int[7]) == (
        3,
        0,
        0,
        0,
        0,
        0,
    )
    assert (nmi[1], _u(nmi, 2, 2), nmi[6], nmi[7]) == (1, 0, 0xFF, 1)  # NMI to every local APIC's LINT1


def test_fits_the_ebda() -> None:
    assert MPTABLE_ADDR == EBDA_START and MPTABLE_ADDR % 16 == 0
    assert len(build_mptable(MAX_VCPUS)) <= 1024
    assert len(build_mptable(1)) < len(build_mptable(2)) < len(build_mptable(MAX_VCPUS))


def test_other_base() -> None:
    image = build_mptable(2, base=0xF0000)
    assert _u(parse(image, 0xF0000).pointer, 4, 4) == 0xF0010
    with pytest.raises(ValueError, match="16-byte aligned"):
        build_mptable(2, base=0xF0008)


@pytest.mark.parametrize("num_cpus", [0, -1, MAX_VCPUS + 1, 255])
def test_bad_cpu_counts(num_cpus: int) -> None:
    with pytest.raises(ConfigError, match=f"invalid vCPU count {num_cpus}: use 1 to {MAX_VCPUS}") as info:
        build_mptable(num_cpus)
    assert "\n" not in str(info.value)
