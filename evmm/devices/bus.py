"""Address buses: port I/O and MMIO ranges mapped to devices.

A device sees offsets into its own range, never absolute addresses, and two devices may not claim overlapping
ranges (Firecracker's bus does the same).  The buses are filled by the machine builder before the first vCPU
runs; a later change (a BAR the guest moves, a hot-added device, on the reactor) replaces the whole lookup
table with one assignment, so vCPU threads resolve addresses without a lock and never see half a change.
"""

from __future__ import annotations

import bisect
from typing import Protocol

from evmm.errors import ConfigError
from evmm.record import record


class BusDevice(Protocol):
    """A register-level device: reads and writes at an offset inside its range.

    ``size`` is the access width in bytes (1, 2 or 4 for port I/O; 1, 2, 4 or 8 for MMIO); values are
    little-endian integers of that width.  A device must never raise on guest input: undefined registers read
    as all ones or zero and ignore writes, as hardware does.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class SplitDevice(BusDevice, Protocol):
    """A device whose hottest registers are safe on the vCPU thread, and the rest belong to the reactor.

    ``read_inline`` returns None and ``write_inline`` False for a register it leaves to the reactor.
    """

    def read_inline(self, offset: int, size: int) -> int | None: ...

    def write_inline(self, offset: int, size: int, value: int) -> bool: ...


@record(frozen=True)
class Mapping:
    base: int
    length: int
    device: BusDevice
    name: str
    # Handled on the vCPU thread that trapped the access instead of on the reactor.  Only for devices that
    # guard their own state with a lock and do no blocking I/O: the UART, whose console output costs several
    # exits per byte, and the ACPI power block, which must work even while the reactor is busy.
    inline: bool = False
    # A ``SplitDevice``: the vCPU thread tries its inline registers first (virtio-mmio's InterruptStatus and
    # InterruptAck, two exits per interrupt), and hands only the others to the reactor.
    split: bool = False

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Non-overlapping ``[base, base+length)`` ranges, looked up by binary search."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._table: tuple[list[int], list[Mapping]] = ([], [])  # bases, mappings: replaced, never mutated

    def insert(
        self,
        base: int,
        length: int,
        device: BusDevice,
        name: str,
        *,
        inline: bool = False,
        split: bool = False,
    ) -> None:
        if length <= 0:
            raise ConfigError(f"{self.name} bus: {name} has an empty range at {base:#x}")
        if split and not (hasattr(device, "read_inline") and hasattr(device, "write_inline")):
            raise ConfigError(f"{self.name} bus: {name} has no inline registers to split on")
        m = Mapping(base, length, device, name, inline, split)
        bases, maps = self._table
        i = bisect.bisect_right(bases, base)
        for other in maps[max(i - 1, 0) : i + 1]:
            if other.base < m.end and m.base < other.end:
                raise ConfigError(
                    f"{self.name} bus: {name} at {base:#x}+{length:#x} overlaps {other.name} "
                    f"at {other.base:#x}+{other.length:#x}"
                )
        self._table = ([*bases[:i], base, *bases[i:]], [*maps[:i], m, *maps[i:]])

    def remove(self, base: int) -> None:
        bases, maps = self._table
        i = bisect.bisect_left(bases, base)
        if i == len(bases) or bases[i] != base:
            raise ConfigError(f"{self.name} bus: nothing is mapped at {base:#x}")
        self._table = (bases[:i] + bases[i + 1 :], maps[:i] + maps[i + 1 :])

    def find(self, addr: int) -> Mapping | None:
        bases, maps = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            m = maps[i]
            if addr < m.end:
                return m
        return None

    def mappings(self) -> list[Mapping]:
        return list(self._table[1])

    def read(self, addr: int, size: int) -> int:
        """Dispatch a read; an access to no device reads as all ones (an unclaimed ISA/PCI bus floats high)."""
        m = self.find(addr)
        if m is None:
            return (1 << (8 * size)) - 1
        return m.device.read(addr - m.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        m = self.find(addr)
        if m is not None:
            m.device.write(addr - m.base, size, value)
