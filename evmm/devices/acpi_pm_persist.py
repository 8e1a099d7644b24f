"""The ACPI register block's and the boot timer's state for a snapshot (evmm/devices/acpi_pm.py,
evmm/devices/boot_timer.py): the sleep type last written, GED events not yet read, whether the boot marker
has fired (a restored guest's init does not run again, and a second marker must not count)."""

from __future__ import annotations

from typing import Any

from evmm.devices.acpi_pm import SLP_TYP_MASK, AcpiPm
from evmm.devices.boot_timer import BootTimer
from evmm.snapshot.format import Fields

VERSION = 1


def save(pm: AcpiPm) -> dict[str, Any]:
    with pm._lock:
        return {"v": VERSION, "slp_typ": pm._slp_typ, "ged_events": pm._ged_events}


def restore(pm: AcpiPm, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    slp_typ, events = f.integer("slp_typ"), f.integer("ged_events")
    with pm._lock:
        pm._slp_typ = slp_typ & SLP_TYP_MASK
        pm._ged_events = events & 0xFF


def save_boot_timer(timer: BootTimer) -> dict[str, Any]:
    with timer._lock:
        return {"v": VERSION, "fired": timer._fired}


def restore_boot_timer(timer: BootTimer, data: object, where: str) -> None:
    fired = Fields(data, where).version(VERSION).boolean("fired")
    with timer._lock:
        timer._fired = fired
