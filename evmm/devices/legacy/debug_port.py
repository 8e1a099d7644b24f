"""The POST diagnostic port 0x80.

Firmware writes progress codes here and Linux writes it as an I/O delay (``native_io_delay()`` does
``outb(0, 0x80)``, unless a KVM guest sees KVM_FEATURE_NOP_IO_DELAY or boots with ``io_delay=none``).  Linux
never reads it; a PC decodes only writes to it, so a read floats high, as an unclaimed port does.  Mapping
the port keeps those writes from being reported as accesses to nothing.  The writes are counted and the last
code kept, for debugging a guest that stops early.
"""

from __future__ import annotations

import threading

from evmm.devices.bus import EVERYTHING_ON_VCPU


class DebugPort:
    """A write-only sink at port 0x80 that counts writes and remembers the last code."""

    on_vcpu = EVERYTHING_ON_VCPU  # Linux's I/O delay: never worth a trip to the reactor

    def __init__(self) -> None:
        self._lock = threading.Lock()  # served on every vCPU thread
        self._writes = 0
        self._last: int | None = None

    @property
    def writes(self) -> int:
        return self._writes

    @property
    def last_code(self) -> int | None:
        """The low byte of the last value written, or None before any write."""
        return self._last

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._writes += 1
            self._last = value & 0xFF
