"""Address buses: port I/O and MMIO ranges mapped to devices.

A device sees offsets into its own range, never absolute addresses, and two devices may not claim overlapping
ranges (Firecracker's bus does the same).  The buses are filled by the machine builder before the first vCPU
runs; lookups are then read-only, so vCPU threads may resolve addresses without taking a lock.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any, Protocol, cast

from evmm.errors import ConfigError
from evmm.record import record

# How a vCPU thread has a function run on the reactor and waits for its result (ExitChannel.call).
OnReactor = Callable[..., Any]


def here(fn: Callable[..., Any], *args: Any) -> Any:
    """The ``OnReactor`` of a caller that is on the reactor already."""
    return fn(*args)


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
        self._bases: list[int] = []
        self._maps: list[Mapping] = []

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
        if m.inline:
            return m.device.read(offset, size)
        if m.split:
            value = cast(SplitDevice, m.device).read_inline(offset, size)
            if value is not None:
                return value
        result: int = on_reactor(m.device.read, offset, size)
        return result

    def write(self, addr: int, size: int, value: int, on_reactor: OnReactor = here) -> None:
        """One write, served as ``read`` serves reads; a write to nothing is dropped."""
        m = self.find(addr)
        if m is None:
            return
        offset = addr - m.base
        if m.inline:
            m.device.write(offset, size, value)
        elif not (m.split and cast(SplitDevice, m.device).write_inline(offset, size, value)):
            on_reactor(m.device.write, offset, size, value)

    def read_string(self, addr: int, size: int, count: int, on_reactor: OnReactor = here) -> bytes:
        """``count`` reads of one register (``rep ins``), little-endian, in one trip to the reactor."""
        m = self.find(addr)
        if m is None:
            return b"\xff" * (size * count)
        if m.inline:
            return _read_values(m.device, addr - m.base, size, count)
        result: bytes = on_reactor(_read_values, m.device, addr - m.base, size, count)
        return result

    def write_string(self, addr: int, size: int, data: bytes, on_reactor: OnReactor = here) -> None:
        """The values of ``rep outs`` (``size`` bytes each, little-endian) to one register, in one trip."""
        m = self.find(addr)
        if m is None:
            return
        values = [int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)]
        if m.inline:
            _write_values(m.device, addr - m.base, size, values)
        else:
            on_reactor(_write_values, m.device, addr - m.base, size, values)


def _read_values(device: BusDevice, offset: int, size: int, count: int) -> bytes:
    return b"".join(device.read(offset, size).to_bytes(size, "little") for _ in range(count))


def _write_values(device: BusDevice, offset: int, size: int, values: list[int]) -> None:
    for v in values:
        device.write(offset, size, v)
