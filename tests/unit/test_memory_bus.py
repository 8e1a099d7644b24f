"""Guest memory bounds checks and bus range rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evmm.devices.bus import Bus
from evmm.errors import ConfigError, GuestMemoryError
from evmm.memory import GuestMemory

MEM = GuestMemory.anonymous([(0, 0x10000), (0x100000, 0x10000)])


def test_reads_and_writes_round_trip_in_each_region() -> None:
    MEM.write(0x10, b"abc")
    MEM.write_u64(0x100008, 0x1122334455667788)
    assert MEM.read(0x10, 3) == b"abc"
    assert MEM.read_u32(0x100008) == 0x55667788
    assert MEM.read_u16(0x10) == 0x6261
    view = MEM.view(0x100000, 4)
    view[:] = b"wxyz"
    assert MEM.read(0x100000, 4) == b"wxyz"


@pytest.mark.parametrize(("gpa", "n"), [(0xFFFF, 2), (0x10000, 1), (0xFFFFF, 2), (0x110000, 1), (-1, 1)])
def test_accesses_outside_ram_are_refused(gpa: int, n: int) -> None:
    with pytest.raises(GuestMemoryError):
        MEM.read(gpa, n)
    assert not MEM.contains(gpa, n)


@given(st.integers(min_value=-(1 << 64), max_value=1 << 64), st.integers(min_value=-10, max_value=1 << 20))
def test_no_address_escapes_guest_ram(gpa: int, n: int) -> None:
    try:
        data = MEM.read(gpa, n)
    except GuestMemoryError:
        return
    assert len(data) == n
    assert any(r.gpa <= gpa and gpa + n <= r.end for r in MEM.regions)


class Dev:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return 0x12

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, value))


def test_bus_gives_devices_offsets_and_refuses_overlaps() -> None:
    bus = Bus("pio")
    a, b = Dev(), Dev()
    bus.insert(0x3F8, 8, a, "com1")
    bus.insert(0x400, 4, b, "other")
    assert bus.read(0x3FD, 1) == 0x12
    bus.write(0x402, 1, 7)
    assert a.log == [("r", 5, 1)] and b.log == [("w", 2, 7)]
    assert bus.read(0x500, 2) == 0xFFFF  # nothing there: floats high
    for base, length in ((0x3FF, 2), (0x3F0, 9), (0x3F8, 1), (0x3F0, 0x20)):
        with pytest.raises(ConfigError, match="overlaps"):
            bus.insert(base, length, Dev(), "clash")
    bus.insert(0x3F0, 8, Dev(), "adjacent")  # touching is fine
    bus.remove(0x3F8)
    assert bus.find(0x3F8) is None
