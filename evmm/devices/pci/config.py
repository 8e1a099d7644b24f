"""A PCI function's configuration space: bytes, which bits the guest may write, and the capability list.

PCI Local Bus Specification 3.0 §6.1-§6.2 (the type-0 header) and §6.7 (capabilities); through ECAM the space
is 4 KiB (PCI Express Base Specification §7.2.2), of which a conventional function uses the first 256 bytes
and reads zeros above.  Every access goes byte by byte through two masks, so any width at any offset is
well defined, whatever a hostile guest sends: ``writable`` bits take the value written, ``clear_on_write``
bits (RW1C status bits) are cleared by writing ones, the rest are read-only.  A BAR's low bits are
read-only this way, which is all BAR sizing needs (write ones, read back the mask: §6.2.5.1).
"""

from __future__ import annotations

from evmm.errors import ConfigError

CONFIG_SPACE_SIZE = 4096  # ECAM: 4 KiB per function
LEGACY_CONFIG_SIZE = 256  # what 0xCF8/0xCFC reaches, and all a conventional function has

# Type-0 header registers (PCI 3.0 §6.1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A  # subclass, then base class at 0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_END = 0x40  # capabilities start here

# Command register bits (§6.2.2).
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE
)

# Status register bits (§6.2.3).
STATUS_INTERRUPT = 1 << 3  # INTx asserted (read-only)
STATUS_CAP_LIST = 1 << 4
STATUS_ERRORS = 0xF900  # parity, signalled/received aborts, SERR, detected parity: RW1C

HEADER_TYPE_NORMAL = 0x00


class ConfigSpace:
    """``size`` bytes with their write masks; capabilities added from 0x40 upwards."""

    def __init__(self, size: int = CONFIG_SPACE_SIZE) -> None:
        self.data = bytearray(size)
        self.writable = bytearray(size)
        self.clear_on_write = bytearray(size)
        self._next_cap = HEADER_END
        self._last_cap: int | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    # --- the guest's accesses ---

    def read(self, offset: int, size: int) -> int:
        """Little-endian ``size`` bytes at ``offset``; bytes past the end read as zero."""
        value = 0
        for i in range(size):
            at = offset + i
            if 0 <= at < len(self.data):
                value |= self.data[at] << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply a guest write through the masks; bytes past the end are dropped."""
        for i in range(size):
            at = offset + i
            if not 0 <= at < len(self.data):
                continue
            byte = (value >> (8 * i)) & 0xFF
            mask, w1c = self.writable[at], self.clear_on_write[at]
            self.data[at] = ((self.data[at] & ~mask) | (byte & mask)) & ~(byte & w1c) & 0xFF

    # --- the device's own view ---

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int, writable: int = 0, clear_on_write: int = 0) -> None:
        """Set a register's value and which of its bits the guest may write or clear."""
        if offset < 0 or offset + size > len(self.data):
            raise ConfigError(
                f"config register {offset:#x}+{size} is outside the {len(self.data)}-byte space"
            )
        self.data[offset : offset + size] = value.to_bytes(size, "little")
        self.writable[offset : offset + size] = writable.to_bytes(size, "little")
        self.clear_on_write[offset : offset + size] = clear_on_write.to_bytes(size, "little")

    def set_bits(self, offset: int, size: int, bits: int, on: bool) -> None:
        """Change bits the guest cannot write (status, pending flags) without touching the masks."""
        value = self.get(offset, size)
        self.data[offset : offset + size] = ((value | bits) if on else (value & ~bits)).to_bytes(
            size, "little"
        )

    def add_capability(self, cap_id: int, body: bytes, writable: bytes = b"") -> int:
        """Append a capability (§6.7): ID, next pointer, then ``body``; returns its offset.

        ``writable`` masks ``body`` byte for byte (missing bytes are read-only).  The chain starts at the
        Capabilities Pointer and each capability is dword aligned.
        """
        offset = self._next_cap
        end = offset + 2 + len(body)
        if end > LEGACY_CONFIG_SIZE:
            raise ConfigError(f"capability {cap_id:#x} does not fit in the first 256 bytes of config space")
        self.data[offset : offset + 2] = bytes([cap_id, 0])
        self.data[offset + 2 : end] = body
        self.writable[offset + 2 : offset + 2 + len(writable)] = writable
        if self._last_cap is None:
            self.set(CAPABILITY_LIST, 1, offset)
            self.set_bits(STATUS, 2, STATUS_CAP_LIST, True)
        else:
            self.data[self._last_cap + 1] = offset
        self._last_cap = offset
        self._next_cap = -(-end // 4) * 4
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, ID) of each capability, following the chain as a driver does."""
        out: list[tuple[int, int]] = []
        at = self.data[CAPABILITY_LIST] if self.get(STATUS, 2) & STATUS_CAP_LIST else 0
        while at and len(out) < 48:  # 48 dword-aligned capabilities fill the 192 bytes after the header
            out.append((at, self.data[at]))
            at = self.data[at + 1]
        return out
