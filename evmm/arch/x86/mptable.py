"""The Intel MultiProcessor Specification 1.4 table, for guests booted with ``acpi=off``.

Layout at ``base`` (the EBDA, which Linux scans for "_MP_" as the last KiB of base memory, MP spec §4):
the 16-byte MP floating pointer structure, then the MP configuration table ("PCMP") with its entries in the
order the spec requires (§4.3): processors, bus, I/O APIC, I/O interrupt assignments, local interrupts.

Interrupt routing follows SeaBIOS on QEMU/KVM (its ``etc/irq0-override`` case), which agrees with our MADT:
ISA IRQ0 (the 8254) goes to IOAPIC pin 2, ISA IRQ2 (the 8259 cascade) has no entry, every other IRQ n goes to
pin n.  The 8259's output is an ExtINT on LINT0 of the BSP, and NMI is LINT1 on every local APIC.

Unlike the MP spec's default configurations (chapter 5), there is no ExtINT entry on IOAPIC pin 0: KVM wires the
in-kernel 8259 to the local APICs' LINT0 only and drops ExtINT messages from the IOAPIC, so such an entry would
describe a wire that does not exist.  Linux would then warn "ExtINT not setup in hardware but reported by MP
table" and, on shutdown or kexec, hand the 8259 to IOAPIC pin 0 instead of LINT0.

Pins 16-23 are listed too, as "ISA" IRQs 16-23 as Firecracker does: no MP bus type fits them, and without an
entry Linux (with ``acpi=off``) maps no IRQ to those pins, so a virtio-mmio device there could not be used.
"""

from __future__ import annotations

import struct

from evmm.arch.x86.layout import IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MAX_VCPUS, MPTABLE_ADDR
from evmm.errors import ConfigError

EBDA_SIZE = 1024
SPEC_REVISION = 4  # MP spec 1.4
OEM_ID = b"EVMM    "
PRODUCT_ID = b"EVMMVM      "

# Entry types (MP spec §4.3).
PROCESSOR = 0
BUS = 1
IOAPIC = 2
IO_INTERRUPT = 3
LOCAL_INTERRUPT = 4

# Interrupt types (MP spec §4.3.4) and the "conforms to bus" polarity/trigger flags.
INT = 0
NMI = 1
EXT_INT = 3
CONFORMS = 0

CPU_ENABLED = 1 << 0
CPU_BOOT_PROCESSOR = 1 << 1
LAPIC_VERSION = 0x14  # what KVM's local APIC reports in its version register
IOAPIC_VERSION = 0x11  # KVM's IOAPIC (82093AA-compatible)
IOAPIC_ENABLED = 1 << 0
# CPU signature and feature flags only inform; Linux reads APIC id and flags.  Family 6, with FPU and APIC.
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)

ISA_BUS_ID = 0
ALL_LAPICS = 0xFF
BSP_APIC_ID = 0
TIMER_IRQ = 0
TIMER_PIN = 2
CASCADE_IRQ = 2

# Floating pointer (MP spec §4.1): signature, config table address, length in paragraphs, spec revision,
# checksum, feature bytes 1-5.  Feature byte 1 = 0: a configuration table is present; byte 2 bit 7 (IMCRP)
# = 0: virtual wire mode, there is no IMCR to program.
_FLOATING = struct.Struct("<4sIBBB5x")
# Configuration table header (MP spec §4.2): signature, base table length, spec revision, checksum, OEM id,
# product id, OEM table pointer, OEM table size, entry count, local APIC address, extended table length,
# extended table checksum, reserved.
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")
_PROCESSOR = struct.Struct("<BBBBII8x")  # §4.3.1: type, APIC id, APIC version, flags, signature, features
_BUS = struct.Struct("<BB6s")  # §4.3.2: type, bus id, bus type string
_IOAPIC = struct.Struct("<BBBBI")  # §4.3.3: type, id, version, flags, address
# §4.3.4 and §4.3.5: type, interrupt type, flags, source bus, source IRQ, destination (IO)APIC, pin or LINT.
_INTERRUPT = struct.Struct("<BBHBBBB")


def _checksum(data: bytes | bytearray) -> int:
    return -sum(data) & 0xFF


def _isa_irq_to_pin() -> list[tuple[int, int]]:
    routes = [(TIMER_IRQ, TIMER_PIN)]
    routes += [(irq, irq) for irq in range(1, IOAPIC_PINS) if irq != CASCADE_IRQ]
    return routes


def _entries(num_cpus: int) -> list[bytes]:
    ioapic_id = num_cpus  # the first APIC id after the vCPUs', as in the MADT
    entries = [
        _PROCESSOR.pack(
            PROCESSOR,
            cpu,
            LAPIC_VERSION,
            CPU_ENABLED | (CPU_BOOT_PROCESSOR if cpu == 0 else 0),
            CPU_SIGNATURE,
            CPU_FEATURES,
        )
        for cpu in range(num_cpus)
    ]
    entries.append(_BUS.pack(BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(_IOAPIC.pack(IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_ADDR))
    entries += [
        _INTERRUPT.pack(IO_INTERRUPT, INT, CONFORMS, ISA_BUS_ID, irq, ioapic_id, pin)
        for irq, pin in _isa_irq_to_pin()
    ]
    entries.append(_INTERRUPT.pack(LOCAL_INTERRUPT, EXT_INT, CONFORMS, ISA_BUS_ID, 0, BSP_APIC_ID, 0))
    entries.append(_INTERRUPT.pack(LOCAL_INTERRUPT, NMI, CONFORMS, ISA_BUS_ID, 0, ALL_LAPICS, 1))
    return entries


def build_mptable(num_cpus: int, base: int = MPTABLE_ADDR) -> bytes:
    """The floating pointer and configuration table, to be written at guest-physical ``base``."""
    if not 1 <= num_cpus <= MAX_VCPUS:
        raise ConfigError(f"invalid vCPU count {num_cpus}: use 1 to {MAX_VCPUS}")
    if base % 16 or not 0 <= base < 1 << 32:
        raise ValueError(f"MP table base {base:#x} must be 16-byte aligned and below 4 GiB")  # MP spec §4.1

    entries = _entries(num_cpus)
    body = b"".join(entries)
    header = bytearray(
        _HEADER.pack(
            b"PCMP",
            _HEADER.size + len(body),
            SPEC_REVISION,
            0,
            OEM_ID,
            PRODUCT_ID,
            0,
            0,
            len(entries),
            LAPIC_ADDR,
            0,
            0,
        )
    )
    header[7] = _checksum(header + body)

    floating = bytearray(_FLOATING.pack(b"_MP_", base + _FLOATING.size, 1, SPEC_REVISION, 0))
    floating[10] = _checksum(floating)

    table = bytes(floating + header + body)
    if len(table) > EBDA_SIZE:
        raise AssertionError(f"MP table of {len(table)} bytes overflows the 1 KiB EBDA")
    return table
