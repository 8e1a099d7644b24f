"""Address buses: port I/O and MMIO ranges mapped to devices, and the thread each access is served on.

A device sees offsets into its own range, never absolute addresses, and two devices may not claim overlapping
ranges (Firecracker's bus does the same).  The buses are filled by the machine builder before the first vCPU
runs; lookups are then read-only, so vCPU threads may resolve addresses without taking a lock.

Threads: the reactor owns device state, so an access is served there (the vCPU waits for the answer), except
where the device declares in ``on_vcpu`` that it serves the register on the vCPU thread that trapped the
access.  The bus reads that declaration once, at ``insert``, and ``read``/``write`` follow it: the one place
that decides which thread serves which register.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Protocol

from evmm.errors import ConfigError
from evmm.record import record

# How a vCPU thread has a function run on the reactor and waits for its result (ExitChannel.call).
OnReactor = Callable[..., Any]


def here(fn: Callable[..., Any], *args: Any) -> Any:
    """The ``OnReactor`` of a caller that is on the reactor already."""
    return fn(*args)


@record(frozen=True)
class OnVcpu:
    """The accesses a device serves on the vCPU thread that trapped them instead of on the reactor.

    Only for registers whose state the device guards itself (a lock, or one field read or written whole) and
    that never block: a vCPU is in the middle of an instruction.  Worth it where an exit is hot: the UART
    (several exits per console byte), virtio-mmio's InterruptStatus and InterruptAck (two exits per
    interrupt), the ACPI power block (power-off must work while the reactor is busy).
    """

    everything: bool = False
    reads: frozenset[int] = frozenset()  # offsets whose reads, of any width, are served on the vCPU
    writes: frozenset[int] = frozenset()


ON_REACTOR = OnVcpu()
EVERYTHING_ON_VCPU = OnVcpu(everything=True)


class BusDevice(Protocol):
    """A register-level device: reads and writes at an offset inside its range.

    ``size`` is the access width in bytes (1, 2 or 4 for port I/O; 1, 2, 4 or 8 for MMIO); values are
    little-endian integers of that width.  A device must never raise on guest input: undefined registers read
    as all ones or zero and ignore writes, as hardware does.  A device that serves some registers on the vCPU
    thread says which in an ``on_vcpu`` attribute (an ``OnVcpu``); without one, all go to the reactor.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


def read_bytewise(read_byte: Callable[[int], int], offset: int, size: int) -> int:
    """A read wider than an 8-bit device's registers: a byte cycle to each register it covers, the lowest
    address in the lowest byte (as an ISA bus splits it)."""
    value = 0
    for i in range(size):
        value |= read_byte(offset + i) << (8 * i)
    return value


def write_bytewise(write_byte: Callable[[int, int], None], offset: int, size: int, value: int) -> None:
    """A write wider than an 8-bit device's registers, split as ``read_bytewise`` splits a read."""
    for i in range(size):
        write_byte(offset + i, (value >> (8 * i)) & 0xFF)


@record(frozen=True)
class Mapping:
    base: int
    length: int
    device: BusDevice
    name: str
    on_vcpu: OnVcpu = ON_REACTOR  # the device's declaration, read once at insert

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Non-overlapping ``[base, base+length)`` ranges, looked up by binary search."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._maps: list[Mapping] = []

    def insert(self, base: int, length: int, device: BusDevice, name: str) -> None:
        if length <= 0:
            raise ConfigError(f"{self.name} bus: {name} has an empty range at {base:#x}")
        on_vcpu = getattr(device, "on_vcpu", ON_REACTOR)
        if not isinstance(on_vcpu, OnVcpu):
            raise ConfigError(f"{self.name} bus: {name}'s on_vcpu is not an OnVcpu")
        m = Mapping(base, length, device, name, on_vcpu)
        i = bisect.bisect_right(self._bases, base)
        for other in self._maps[max(i - 1, 0) : i + 1]:
            if other.base < m.end and m.base < other.end:
                raise ConfigError(
                    f"{self.name} bus: {name} at {base:#x}+{length:#x} overlaps {other.name} "
                    f"at {other.base:#x}+{other.length:#x}"
                )
        self._bases.insert(i, base)
        self._maps.insert(i, m)

    def remove(self, base: int) -> None:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise ConfigError(f"{self.name} bus: nothing is mapped at {base:#x}")
        del self._bases[i]
        del self._maps[i]

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            m = self._maps[i]
            if addr < m.end:
                return m
        return None

    def mappings(self) -> list[Mapping]:
        return list(self._maps)

    # ---- dispatch: the vCPU thread's one way to reach a device ---------------------------------------------

    def read(self, addr: int, size: int, on_reactor: OnReactor = here) -> int:
        """One read of ``size`` bytes at ``addr``, served on the thread its register belongs to.

        ``on_reactor(fn, *args)`` runs ``fn`` on the reactor and returns its result (the vCPU's exit channel);
        the default runs it here, for callers already on the reactor.  Nothing at ``addr`` reads as all ones:
        an unclaimed ISA or PCI bus floats high.
        """
        m = self.find(addr)
        if m is None:
            return (1 << (8 * size)) - 1
        offset = addr - m.base
        where = m.on_vcpu
        if where.everything or offset in where.reads:
            return m.device.read(offset, size)
        result: int = on_reactor(m.device.read, offset, size)
        return result

    def write(self, addr: int, size: int, value: int, on_reactor: OnReactor = here) -> None:
        """One write, served as ``read`` serves reads; a write to nothing is dropped."""
        m = self.find(addr)
        if m is None:
            return
        offset = addr - m.base
        where = m.on_vcpu
        if where.everything or offset in where.writes:
            m.device.write(offset, size, value)
        else:
            on_reactor(m.device.write, offset, size, value)

    def read_string(self, addr: int, size: int, count: int, on_reactor: OnReactor = here) -> bytes:
        """``count`` reads of one register (``rep ins``), little-endian, in one trip to the reactor."""
        m = self.find(addr)
        if m is None:
            return b"\xff" * (size * count)
        offset = addr - m.base
        if m.on_vcpu.everything or offset in m.on_vcpu.reads:
            return _read_values(m.device, offset, size, count)
        result: bytes = on_reactor(_read_values, m.device, offset, size, count)
        return result

    def write_string(self, addr: int, size: int, data: bytes, on_reactor: OnReactor = here) -> None:
        """The values of ``rep outs`` (``size`` bytes each, little-endian) to one register, in one trip."""
        m = self.find(addr)
        if m is None:
            return
        values = [int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)]
        offset = addr - m.base
        if m.on_vcpu.everything or offset in m.on_vcpu.writes:
            _write_values(m.device, offset, size, values)
        else:
            on_reactor(_write_values, m.device, offset, size, values)


def _read_values(device: BusDevice, offset: int, size: int, count: int) -> bytes:
    return b"".join(device.read(offset, size).to_bytes(size, "little") for _ in range(count))


def _write_values(device: BusDevice, offset: int, size: int, values: list[int]) -> None:
    for v in values:
        device.write(offset, size, v)
