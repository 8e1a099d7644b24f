"""The MCFG table: where each PCI segment's ECAM window is (PCI Firmware Specification 3.3 §4.1.2).

After the standard header, 8 reserved bytes, then one 16-byte allocation structure per ECAM window: base
address, PCI segment group, first and last bus number, 4 reserved bytes.  Linux uses the window once it
finds it reserved by a PNP0C01/PNP0C02 device's _CRS (or in e820), which the board's DSDT provides.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from evmm.record import record

SIGNATURE = b"MCFG"
REVISION = 1
HEADER_SIZE = 36
_ALLOCATION = struct.Struct("<QHBB4x")


@record(frozen=True)
class EcamWindow:
    base: int
    segment: int = 0
    first_bus: int = 0
    last_bus: int = 255

    @property
    def size(self) -> int:
        return (self.last_bus - self.first_bus + 1) << 20


def build_mcfg(windows: Sequence[EcamWindow]) -> bytes:
    """The MCFG with a blank 36-byte header, which ``tables`` fills in and checksums."""
    body = bytearray(8)  # reserved
    for w in windows:
        if not (
            0 <= w.first_bus <= w.last_bus <= 255 and w.base % (1 << 20) == 0 and 0 <= w.segment < 1 << 16
        ):
            raise ValueError(f"bad ECAM window {w}")
        body += _ALLOCATION.pack(w.base, w.segment, w.first_bus, w.last_bus)
    return bytes(HEADER_SIZE) + bytes(body)
