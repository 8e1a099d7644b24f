"""Base Address Registers: how a BAR is laid out in config space and where it decodes (PCI 3.0 §6.2.5.1).

A BAR's size is a power of two and its address bits below the size are read-only zeros, so a driver sizes it
by writing all ones and reading back; bits 3:0 of a memory BAR say 32- or 64-bit and prefetchable, bit 0 of
an I/O BAR is 1.  A 64-bit BAR takes two registers, the second holding the high half.

Where a BAR decodes is the guest's choice, and so hostile input.  The rules (QEMU's pci_bar_address does the
same): nothing unless the command register enables that space; nothing at address 0 (unassigned, as Linux
treats it); nothing for a BAR whose last byte would be the last address it can name, which is the sizing
pattern (all ones written) and never a placement; I/O only below 64 KiB, the x86 port space.  Anything else
is honoured, overlapping other BARs or not: the region tree decides who is seen, and nothing the guest
writes here can reach RAM, which lies outside the PCI windows.
"""

from __future__ import annotations

import enum

from evmm.devices.pci.config import BAR0, COMMAND_IO, COMMAND_MEMORY, ConfigSpace
from evmm.errors import ConfigError
from evmm.record import record

MEM_TYPE_64 = 0b100  # bits 2:1 = 10
MEM_PREFETCH = 1 << 3
IO_SPACE = 1 << 0
IO_LIMIT = 0x10000


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


@record(frozen=True)
class Bar:
    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size & (self.size - 1):
            raise ConfigError(f"BAR {self.index}: size {self.size:#x} is not a power of two")
        last = 4 if self.kind is BarKind.MEM64 else 5
        if not 0 <= self.index <= last:
            raise ConfigError(f"BAR {self.index}: a {self.kind.value} BAR takes an index 0-{last}")
        if self.kind is BarKind.IO and not 4 <= self.size <= 256:
            raise ConfigError(f"BAR {self.index}: an I/O BAR is 4 to 256 bytes (PCI 3.0 §6.2.5.1)")
        if self.kind is not BarKind.IO and not 16 <= self.size <= (
            1 << 31 if self.kind is BarKind.MEM32 else 1 << 63
        ):
            raise ConfigError(f"BAR {self.index}: a {self.kind.value} BAR cannot be {self.size:#x} bytes")

    @property
    def registers(self) -> tuple[int, ...]:
        """Config-space offsets of the BAR's register(s)."""
        first = BAR0 + 4 * self.index
        return (first, first + 4) if self.kind is BarKind.MEM64 else (first,)

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO

    def install(self, cfg: ConfigSpace, address: int = 0) -> None:
        """Write the BAR's flags, its writable address bits and an initial ``address`` into ``cfg``."""
        if address & (self.size - 1):
            raise ConfigError(
                f"BAR {self.index}: address {address:#x} is not aligned to its size {self.size:#x}"
            )
        if self.kind is BarKind.IO:
            cfg.set(self.registers[0], 4, address | IO_SPACE, writable=~(self.size - 1) & 0xFFFC)
            return
        flags = MEM_PREFETCH if self.prefetchable else 0
        address_mask = ~(self.size - 1) & 0xFFFF_FFFF_FFFF_FFF0
        if self.kind is BarKind.MEM32:
            cfg.set(self.registers[0], 4, address | flags, writable=address_mask & 0xFFFF_FFF0)
            return
        low, high = self.registers
        cfg.set(low, 4, (address & 0xFFFF_FFFF) | flags | MEM_TYPE_64, writable=address_mask & 0xFFFF_FFF0)
        cfg.set(high, 4, address >> 32, writable=address_mask >> 32)

    def programmed(self, cfg: ConfigSpace) -> int:
        """The address the guest wrote, whether or not it decodes."""
        if self.kind is BarKind.IO:
            return cfg.get(self.registers[0], 4) & 0xFFFC
        address = cfg.get(self.registers[0], 4) & 0xFFFF_FFF0
        if self.kind is BarKind.MEM64:
            address |= cfg.get(self.registers[1], 4) << 32
        return address

    def decoded(self, cfg: ConfigSpace, command: int) -> int | None:
        """Where the BAR decodes now, or None (see the module's rules)."""
        enabled = command & (COMMAND_IO if self.kind is BarKind.IO else COMMAND_MEMORY)
        address = self.programmed(cfg)
        if not enabled or address == 0:
            return None
        limit = {BarKind.IO: IO_LIMIT, BarKind.MEM32: 1 << 32, BarKind.MEM64: 1 << 64}[self.kind]
        if address + self.size >= limit:
            return None
        return address
