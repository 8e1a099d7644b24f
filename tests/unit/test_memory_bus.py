"""Guest memory bounds checks, and the buses: range rules, unclaimed accesses, and the thread each register is
served on (what the vCPU dispatcher asks of them for every exit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evmm.devices.bus import EVERYTHING_ON_VCPU, ON_REACTOR, Bus, OnVcpu
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
    def __init__(self, on_vcpu: OnVcpu = ON_REACTOR) -> None:
        self.on_vcpu = on_vcpu
        self.log: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return 0x12

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, value))


class Reactor:
    """The exit channel's stand-in: runs the call in place and records that the access went to the reactor."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(fn.__name__)
        return fn(*args)


def test_bus_gives_devices_offsets_and_refuses_overlaps() -> None:
    bus = Bus("pio")
    a, b = Dev(), Dev()
    bus.insert(0x3F8, 8, a, "com1")
    bus.insert(0x400, 4, b, "other")
    assert bus.read(0x3FD, 1) == 0x12
    bus.write(0x402, 1, 7)
    assert a.log == [("r", 5, 1)] and b.log == [("w", 2, 7)]
    for base, length in ((0x3FF, 2), (0x3F0, 9), (0x3F8, 1), (0x3F0, 0x20)):
        with pytest.raises(ConfigError, match="overlaps"):
            bus.insert(base, length, Dev(), "clash")
    bus.insert(0x3F0, 8, Dev(), "adjacent")  # touching is fine
    bus.remove(0x3F8)
    assert bus.find(0x3F8) is None


def test_unclaimed_accesses_float_high_and_writes_vanish() -> None:
    bus, reactor = Bus("pio"), Reactor()
    bus.insert(0x3F8, 8, Dev(), "com1")
    assert bus.read(0x500, 2, reactor) == 0xFFFF
    assert bus.read(0x3F7, 1, reactor) == 0xFF  # just below a device
    assert bus.read(0x400, 4, reactor) == 0xFFFFFFFF  # just past its end
    assert bus.read_string(0x500, 2, 3, reactor) == b"\xff" * 6
    bus.write(0x500, 1, 1, reactor)
    bus.write_string(0x500, 1, b"abc", reactor)
    assert reactor.calls == []  # nothing to serve, nowhere to go


def test_each_register_is_served_where_its_device_declares() -> None:
    bus, reactor = Bus("mmio"), Reactor()
    plain = Dev()  # declares nothing: everything on the reactor
    everything = Dev(EVERYTHING_ON_VCPU)
    some = Dev(OnVcpu(reads=frozenset({0x60}), writes=frozenset({0x64})))
    bus.insert(0x1000, 0x100, plain, "plain")
    bus.insert(0x2000, 0x100, everything, "everything")
    bus.insert(0x3000, 0x100, some, "some")

    bus.read(0x1010, 4, reactor)
    bus.write(0x1010, 4, 1, reactor)
    assert reactor.calls == ["read", "write"]
    reactor.calls.clear()

    bus.read(0x2010, 4, reactor)
    bus.write(0x2010, 4, 1, reactor)
    assert reactor.calls == [] and everything.log == [("r", 0x10, 4), ("w", 0x10, 1)]

    bus.read(0x3060, 4, reactor)  # declared reads and writes stay on the vCPU thread, whatever the width
    bus.read(0x3060, 1, reactor)
    bus.write(0x3064, 4, 1, reactor)
    assert reactor.calls == []
    bus.write(0x3060, 4, 1, reactor)  # a read register is not a write register
    bus.read(0x3064, 4, reactor)
    assert reactor.calls == ["write", "read"]


def test_string_io_takes_one_trip_to_the_reactor_for_all_its_values() -> None:
    bus, reactor = Bus("pio"), Reactor()
    dev = Dev()
    bus.insert(0x40, 4, dev, "dev")
    bus.write_string(0x41, 2, b"\x01\x00\x02\x00\x03\x00", reactor)  # rep outsw, three words
    assert bus.read_string(0x42, 1, 2, reactor) == b"\x12\x12"  # rep insb, two bytes
    assert reactor.calls == ["_write_values", "_read_values"]
    assert dev.log == [("w", 1, 1), ("w", 1, 2), ("w", 1, 3), ("r", 2, 1), ("r", 2, 1)]


def test_a_declaration_that_is_not_an_on_vcpu_is_refused() -> None:
    dev = Dev()
    dev.on_vcpu = "everything"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="com1's on_vcpu is not an OnVcpu"):
        Bus("pio").insert(0x3F8, 8, dev, "com1")
