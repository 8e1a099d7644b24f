"""Legacy INTx routing: which IOAPIC input each slot's pin drives, and lines shared by several devices.

With no bridges and no interrupt link devices, the _PRT maps each (device, pin) of bus 0 straight to a GSI
(ACPI 6.5 §6.2.13: a zero Source means the Source Index is a GSI, level-triggered, active-low, shareable).
The usual swizzle spreads slots over the inputs: pin ``p`` (1 = INTA#) of device ``d`` uses input
``(d + p - 1) mod n``.  Devices that share an input drive it together: the line is high while any is.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from evmm.devices.irq import IrqLine


def intx_gsi(slot: int, pin: int, gsis: Sequence[int]) -> int:
    """The GSI of INTx pin ``pin`` (1-4 for INTA#-INTD#) of device ``slot``."""
    if not 1 <= pin <= 4:
        raise ValueError(f"INTx pin {pin} is not 1-4 (INTA#-INTD#)")
    return gsis[(slot + pin - 1) % len(gsis)]


class SharedLine:
    """One interrupt input, wired-OR of the sources given by ``source()``."""

    def __init__(self, line: IrqLine) -> None:
        self._line = line
        self._lock = threading.Lock()
        self._high: set[int] = set()
        self._next = 0

    def source(self) -> IrqLine:
        self._next += 1
        return _Source(self, self._next)

    def _set(self, source: int, high: bool) -> None:
        with self._lock:
            if high:
                self._high.add(source)
            else:
                self._high.discard(source)
            self._line.set_level(bool(self._high))


class _Source:
    def __init__(self, shared: SharedLine, ident: int) -> None:
        self._shared = shared
        self._ident = ident

    def set_level(self, high: bool) -> None:
        self._shared._set(self._ident, high)
