"""The 16550A's state for a snapshot (evmm/devices/legacy/serial.py), as Firecracker keeps a persist module
beside each device.

Saved: every register, the RX FIFO and the pending-interrupt flags.  Not saved: the interrupt line's level,
which is recomputed from the registers on restore and driven onto the new VM's line (a fresh ``KvmIrqLine``
starts low, and KVM's restored IOAPIC does not remember which source held a level line up).
"""

from __future__ import annotations

from typing import Any

from evmm.devices.legacy.serial import Serial
from evmm.snapshot.format import Fields

VERSION = 1
_REGISTERS = ("ier", "lcr", "mcr", "fcr", "scr", "dll", "dlm", "lsr_errors", "msr_delta")


def save(serial: Serial) -> dict[str, Any]:
    with serial._lock:
        out: dict[str, Any] = {"v": VERSION, **{r: getattr(serial, f"_{r}") for r in _REGISTERS}}
        out.update(rx=bytes(serial._rx), thr_pending=serial._thr_pending, rx_waiting=serial._rx_waiting)
    return out


def restore(serial: Serial, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    values = {r: f.integer(r, 0xFF) for r in _REGISTERS}
    rx = f.blob("rx")
    thr_pending, rx_waiting = f.boolean("thr_pending"), f.boolean("rx_waiting")
    with serial._lock:
        for r, v in values.items():
            setattr(serial, f"_{r}", v)
        serial._rx.clear()
        serial._rx.extend(rx)
        serial._thr_pending = thr_pending
        serial._rx_waiting = rx_waiting
        update = serial._level_update()
        serial._sync_fast()
    serial._apply_level(update)
