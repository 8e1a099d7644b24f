"""MSI-X (PCI 3.0 §6.8.2): the capability, the vector table and the Pending Bit Array a BAR exposes, and
the rules that decide whether a vector's interrupt is delivered now or held pending.

A vector is delivered when MSI-X is enabled, the function is not masked and the vector is not masked;
otherwise its pending bit is set, and the message goes out when the last mask that held it clears
(§6.8.2.9).  Every vector starts masked.  Delivery goes through an injected ``MsiSink``: ``route`` (re)binds
a vector to its message address and data, lazily, only when an entry the guest changed is about to be used,
and ``fire`` sends it (with KVM: an MSI route in the GSI table and a write to the vector's irqfd).

The table and PBA take aligned dword and qword accesses (§6.8.2: anything else is undefined); others read
as zero and are ignored, as is anything past the end and every write to the PBA.  Runs on the reactor.
"""

from __future__ import annotations

from typing import Protocol

from evmm.devices.pci.config import ConfigSpace

CAP_ID_MSIX = 0x11
CAP_LENGTH = 12

# Message Control (capability offset 2).
CONTROL_TABLE_SIZE = 0x07FF  # N - 1
CONTROL_FUNCTION_MASK = 1 << 14
CONTROL_ENABLE = 1 << 15

ENTRY_SIZE = 16
ENTRY_ADDR_LO = 0x0
ENTRY_ADDR_HI = 0x4
ENTRY_DATA = 0x8
ENTRY_VECTOR_CONTROL = 0xC
VECTOR_MASKED = 1 << 0

MAX_VECTORS = 2048


class MsiSink(Protocol):
    def route(self, vector: int, address: int, data: int) -> None:
        """Vector ``vector`` now sends ``data`` to ``address``."""

    def fire(self, vector: int) -> None:
        """Send vector ``vector``'s message."""


def table_bytes(vectors: int) -> int:
    return vectors * ENTRY_SIZE


def pba_bytes(vectors: int) -> int:
    """The PBA is qword-aligned: 64 pending bits per qword (§6.8.2.7)."""
    return -(-vectors // 64) * 8


class Msix:
    def __init__(self, vectors: int, sink: MsiSink) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X has 1 to {MAX_VECTORS} vectors, not {vectors}")
        self.vectors = vectors
        self._sink = sink
        self._table = bytearray(table_bytes(vectors))
        for v in range(vectors):
            self._table[v * ENTRY_SIZE + ENTRY_VECTOR_CONTROL] = VECTOR_MASKED
        self._pending = [False] * vectors
        self._stale = [True] * vectors  # the entry changed since the sink last routed it
        self._cap: tuple[ConfigSpace, int] | None = None

    # --- the capability in config space ---

    def add_capability(self, cfg: ConfigSpace, bar: int, table_offset: int, pba_offset: int) -> int:
        """Add the capability to ``cfg``; the table and PBA live in BAR ``bar`` at those offsets."""
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("the MSI-X table and PBA offsets must be qword aligned")
        control = (self.vectors - 1).to_bytes(2, "little")
        body = control + (table_offset | bar).to_bytes(4, "little") + (pba_offset | bar).to_bytes(4, "little")
        writable = (CONTROL_FUNCTION_MASK | CONTROL_ENABLE).to_bytes(2, "little")
        offset = cfg.add_capability(CAP_ID_MSIX, body, writable)
        self._cap = (cfg, offset)
        return offset

    def _control(self) -> int:
        if self._cap is None:
            return 0
        cfg, offset = self._cap
        return cfg.get(offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control() & CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control() & CONTROL_FUNCTION_MASK)

    def control_written(self) -> None:
        """The guest wrote Message Control: a lifted mask or a fresh enable releases pending vectors."""
        self._release_pending()

    # --- the device's side ---

    def masked(self, vector: int) -> bool:
        return bool(self._table[vector * ENTRY_SIZE + ENTRY_VECTOR_CONTROL] & VECTOR_MASKED)

    def message(self, vector: int) -> tuple[int, int]:
        base = vector * ENTRY_SIZE
        lo = int.from_bytes(self._table[base : base + 4], "little")
        hi = int.from_bytes(self._table[base + 4 : base + 8], "little")
        data = int.from_bytes(self._table[base + 8 : base + 12], "little")
        return hi << 32 | lo, data

    def pending(self, vector: int) -> bool:
        return self._pending[vector]

    def trigger(self, vector: int) -> bool:
        """Interrupt through ``vector``: sent, or held pending while masked.  False when MSI-X is disabled or
        there is no such vector, so the caller can fall back to INTx (or drop it)."""
        if not self.enabled or not 0 <= vector < self.vectors:
            return False
        if self.function_masked or self.masked(vector):
            self._pending[vector] = True
        else:
            self._send(vector)
        return True

    def _send(self, vector: int) -> None:
        if self._stale[vector]:
            self._sink.route(vector, *self.message(vector))
            self._stale[vector] = False
        self._sink.fire(vector)

    def _release_pending(self) -> None:
        if not self.enabled or self.function_masked:
            return
        for vector in range(self.vectors):
            if self._pending[vector] and not self.masked(vector):
                self._pending[vector] = False
                self._send(vector)

    def reset(self) -> None:
        """Function reset: every vector masked, nothing pending, the capability's enables cleared."""
        for v in range(self.vectors):
            self._table[v * ENTRY_SIZE : (v + 1) * ENTRY_SIZE] = bytes(ENTRY_VECTOR_CONTROL) + b"\x01\0\0\0"
        self._pending = [False] * self.vectors
        self._stale = [True] * self.vectors
        if self._cap is not None:
            cfg, offset = self._cap
            cfg.set_bits(offset + 2, 2, CONTROL_ENABLE | CONTROL_FUNCTION_MASK, False)

    # --- the guest's accesses to the table and PBA, at offsets into each ---

    def table_read(self, offset: int, size: int) -> int:
        if not _aligned(offset, size) or offset + size > len(self._table):
            return 0
        return int.from_bytes(self._table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if not _aligned(offset, size) or offset + size > len(self._table):
            return
        for at in range(offset, offset + size, 4):
            self._write_dword(at, (value >> (8 * (at - offset))) & 0xFFFF_FFFF)

    def _write_dword(self, at: int, value: int) -> None:
        vector, field = divmod(at, ENTRY_SIZE)
        if field == ENTRY_VECTOR_CONTROL:
            value &= VECTOR_MASKED  # the other bits are reserved
        elif field == ENTRY_ADDR_LO:
            value &= ~0x3  # dword aligned: bits 1:0 read as zero (§6.8.2.4)
        old = self._table[at : at + 4]
        self._table[at : at + 4] = value.to_bytes(4, "little")
        if field == ENTRY_VECTOR_CONTROL:
            if not value & VECTOR_MASKED:
                self._release_pending()
        elif old != self._table[at : at + 4]:
            self._stale[vector] = True

    def pba_read(self, offset: int, size: int) -> int:
        if not _aligned(offset, size) or offset + size > pba_bytes(self.vectors):
            return 0
        value = 0
        for bit in range(8 * size):
            vector = 8 * offset + bit
            if vector < self.vectors and self._pending[vector]:
                value |= 1 << bit
        return value

    def describe(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "function_masked": self.function_masked,
            "masked": [v for v in range(self.vectors) if self.masked(v)],
            "pending": [v for v in range(self.vectors) if self._pending[v]],
        }


def _aligned(offset: int, size: int) -> bool:
    return size in (4, 8) and offset >= 0 and offset % size == 0
