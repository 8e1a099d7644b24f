"""The boot-timer marker register at ``BOOT_TIMER_BASE``, as Firecracker has it.

A guest's init writes the byte 123 to offset 0 when it considers boot done; the builder, which knows when
the VM started, records the elapsed time in ``on_boot_marker``.  Only a one-byte write of that value at
offset 0 counts, and only the first one: a later marker (a re-run init, a stray write) does not move the
measurement.  Reads return 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from evmm.devices.bus import EVERYTHING_ON_VCPU

BOOT_MARKER = 123  # Firecracker's MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE


class BootTimer:
    """Calls ``on_boot_marker()`` once, on the first marker write, with no lock held."""

    on_vcpu = EVERYTHING_ON_VCPU  # timed on the vCPU thread, not after the reactor gets round to it

    def __init__(self, on_boot_marker: Callable[[], None]) -> None:
        self._on_boot_marker = on_boot_marker
        self._lock = threading.Lock()
        self._fired = False

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 1 or value != BOOT_MARKER:
            return
        with self._lock:
            if self._fired:
                return
            self._fired = True
        self._on_boot_marker()
