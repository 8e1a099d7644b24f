"""ACPI PCI hotplug registers: how the board tells the guest that a slot filled or must be emptied, and how
the guest says it let go of a device (Cloud Hypervisor's and QEMU's ACPI PCI hotplug, through the GED).

The DSDT's slot methods read these registers when the GED interrupt reports a PCI hotplug event: every slot
set in UP gets Notify(Sxx, 1) (Device Check: Linux's acpiphp rescans the slot and binds the new device) and
every slot set in DOWN gets Notify(Sxx, 3) (Eject Request: acpiphp unbinds the driver and calls the slot's
_EJ0), and _EJ0 writes the slot's bit to EJECT (ACPI 6.5 §5.6.6 for the notification values, §6.3.3 _EJx).
UP and DOWN clear when read, so an event is reported once.  All registers are 32-bit; other accesses read
zero and are ignored.  Runs on the reactor, as the control commands that fill slots do.
"""

from __future__ import annotations

from collections.abc import Callable

REG_UP = 0x0  # read: slots added since the last read
REG_DOWN = 0x4  # read: slots whose removal was requested since the last read
REG_EJECT = 0x8  # write: the guest ejected these slots
SIZE = 0x10


class PciHotplugRegisters:
    def __init__(self, notify: Callable[[], None], on_eject: Callable[[int], None] | None = None) -> None:
        """``notify`` raises the GED's PCI hotplug event; ``on_eject(slot)`` is the guest's eject, given here
        or later by whoever owns the devices."""
        self._notify = notify
        self.on_eject = on_eject
        self._up = 0
        self._down = 0

    def announce_added(self, slot: int) -> None:
        self._up |= 1 << slot
        self._notify()

    def request_removal(self, slot: int) -> None:
        self._down |= 1 << slot
        self._notify()

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        if offset == REG_UP:
            value, self._up = self._up, 0
            return value
        if offset == REG_DOWN:
            value, self._down = self._down, 0
            return value
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset != REG_EJECT:
            return
        for slot in range(32):
            if value >> slot & 1 and self.on_eject is not None:
                self.on_eject(slot)
