"""The CMOS RTC's state for a snapshot (evmm/devices/legacy/rtc.py).

The guest's clock is kept as the offset from host time (the RTC is a wall clock, and host time went on while
the VM was a snapshot, so a restored guest reads the real time, as after a host suspend).  Interrupt flags
are up to date to the moment of the restore: events that would have fallen while the VM did not exist are not
raised.  The line level is recomputed and driven; the next timer is asked for again.
"""

from __future__ import annotations

from typing import Any

from evmm.devices.legacy.rtc import CMOS_SIZE, Rtc
from evmm.snapshot.format import Fields, SnapshotError

VERSION = 1


def save(rtc: Rtc) -> dict[str, Any]:
    with rtc._lock:
        return {
            "v": VERSION,
            "index": rtc._index,
            "cmos": bytes(rtc._cmos),
            "flags": rtc._flags,
            "offset": rtc._offset,
        }


def restore(rtc: Rtc, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    cmos = f.blob("cmos")
    if len(cmos) != CMOS_SIZE:
        raise SnapshotError(f"{where}: CMOS RAM is {len(cmos)} bytes, not {CMOS_SIZE}")
    offset = f.data.get("offset")
    if not isinstance(offset, float | int) or isinstance(offset, bool):
        raise SnapshotError(f"{where}: 'offset' is not a number")
    index, flags = f.integer("index"), f.integer("flags")
    with rtc._lock:
        rtc._index = index & 0x7F
        rtc._cmos[:] = cmos
        rtc._flags = flags & 0x70
        rtc._offset = float(offset)
        rtc._last = rtc._now()
        rtc._sync_line()
    rtc.poll()  # the deadline for the restored registers
