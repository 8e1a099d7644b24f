"""The hardware-reduced ACPI register block at ``ACPI_PM_BASE``: sleep control/status, reset, and the
event register of the Generic Event Device.

A hardware-reduced platform (ACPI 6.5 §4.1) has no PM1 blocks: the FADT points its sleep control and sleep
status registers (§4.8.3.7) and its reset register (§4.8.3.6) at this block, and the DSDT's GED
(§5.6.9) reads the event register here when its interrupt fires.  Offsets and values are the ``ACPI_PM_*``
constants of the x86 layout; every register is 8 bits wide, and a wider MMIO access is taken as one access
to each byte it covers.

What Linux does with it (ACPICA hwxfsleep.c/hwesleep.c): to power off it clears WAK_STS, writes
``SLP_TYPx << 2 | SLP_EN`` with the \\_S5 value, and spins until WAK_STS reads 1.  Any other sleep state is
ignored and the machine keeps running; WAK_STS always reads 1, so a guest asking for S1/S3 resumes at once
instead of spinning forever.  ``reboot=a`` writes ``ACPI_RESET_VALUE`` to the reset register.

Threads: served on vCPU threads (``on_vcpu``) while ``power_button`` comes from the reactor, so the pending GED
events sit behind a lock.  Callbacks and the GED interrupt are called after the lock is released;
``on_poweroff`` and ``on_reset`` may be called more than once and must be idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from evmm.arch.x86.layout import (
    ACPI_GED_EVENT_POWER_BUTTON,
    ACPI_PM_GED_EVENT,
    ACPI_PM_RESET,
    ACPI_PM_SLEEP_CONTROL,
    ACPI_PM_SLEEP_STATUS,
    ACPI_RESET_VALUE,
    ACPI_S5_SLP_TYP,
)
from evmm.devices.bus import EVERYTHING_ON_VCPU, read_bytewise, write_bytewise
from evmm.devices.irq import Interrupt

SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x1C  # bits 4:2
SLP_EN = 0x20
WAK_STS = 0x80


class AcpiPm:
    """Sleep control/status, reset and GED event registers."""

    on_vcpu = EVERYTHING_ON_VCPU  # power-off and reset must work while the reactor is busy

    def __init__(self, ged: Interrupt, on_poweroff: Callable[[], None], on_reset: Callable[[], None]) -> None:
        self._ged = ged
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self._slp_typ = 0  # SLP_TYPx is read/write; SLP_EN is write-only and reads 0
        self._ged_events = 0

    def power_button(self) -> None:
        """Press the power button: flag the event and interrupt the guest, whose GED handler reads the event
        register and notifies the control-method power button device (PNP0C0C)."""
        self.ged_event(ACPI_GED_EVENT_POWER_BUTTON)

    def ged_event(self, bits: int) -> None:
        """Flag GED events (``ACPI_GED_EVENT_*``: the power button, a PCI hotplug, a new VM generation) and interrupt the guest."""
        with self._lock:
            self._ged_events |= bits
        self._ged.trigger()

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, offset, size, value)

    def _read_byte(self, reg: int) -> int:
        with self._lock:
            if reg == ACPI_PM_SLEEP_CONTROL:
                return self._slp_typ
            if reg == ACPI_PM_SLEEP_STATUS:
                return WAK_STS
            if reg == ACPI_PM_GED_EVENT:
                events, self._ged_events = self._ged_events, 0  # reading acknowledges the events
                return events
            return 0  # the reset register is write-only; the rest of the block is reserved

    def _write_byte(self, reg: int, value: int) -> None:
        if reg == ACPI_PM_SLEEP_CONTROL:
            with self._lock:
                self._slp_typ = value & SLP_TYP_MASK
            if value & SLP_EN and (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == ACPI_S5_SLP_TYP:
                self._on_poweroff()
        elif reg == ACPI_PM_RESET and value == ACPI_RESET_VALUE:
            self._on_reset()
        # Writing WAK_STS (write-1-to-clear) is a no-op: the machine is always awake.
