"""The MADT (signature "APIC"): the interrupt controllers, ACPI 6.5 §5.2.12.

One Processor Local APIC per vCPU, the in-kernel IOAPIC, the ISA IRQ0 -> GSI2 override that every PC
firmware reports (the 8254 timer is wired to IOAPIC input 2), and LINT1 as NMI on every processor.
"""

from __future__ import annotations

import struct

from evmm.arch.x86.layout import IOAPIC_ADDR, LAPIC_ADDR

SIGNATURE = b"APIC"
REVISION = 6  # the MADT revision of ACPI 6.5 (§5.2.12)
HEADER_SIZE = 36

FLAG_PCAT_COMPAT = 1 << 0  # dual 8259s present: the OS must mask them before using the APICs (§5.2.12)

# Interrupt controller structure types, ACPI 6.5 §5.2.12.
TYPE_LOCAL_APIC = 0
TYPE_IO_APIC = 1
TYPE_INTERRUPT_SOURCE_OVERRIDE = 2
TYPE_LOCAL_APIC_NMI = 4

LOCAL_APIC_ENABLED = 1 << 0  # §5.2.12.2, Local APIC flags
MPS_INTI_CONFORMS = 0  # polarity and trigger "conform to the bus specification" (§5.2.12.5, MPS INTI flags)
ISA_BUS = 0
ALL_PROCESSORS = 0xFF  # Local APIC NMI structure: applies to every processor (§5.2.12.7)
LINT1 = 1

TIMER_IRQ = 0
TIMER_GSI = 2


def _local_apic(uid: int) -> bytes:
    """Processor Local APIC (§5.2.12.2): type, length, ACPI processor UID, APIC ID, flags."""
    return struct.pack("<BBBBI", TYPE_LOCAL_APIC, 8, uid, uid, LOCAL_APIC_ENABLED)


def _io_apic(apic_id: int) -> bytes:
    """I/O APIC (§5.2.12.3): type, length, id, reserved, address, GSI base."""
    return struct.pack("<BBBBII", TYPE_IO_APIC, 12, apic_id, 0, IOAPIC_ADDR, 0)


def _source_override(irq: int, gsi: int) -> bytes:
    """Interrupt Source Override (§5.2.12.5): type, length, bus, source IRQ, GSI, MPS INTI flags."""
    return struct.pack("<BBBBIH", TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, irq, gsi, MPS_INTI_CONFORMS)


def _local_apic_nmi() -> bytes:
    """Local APIC NMI (§5.2.12.7): type, length, processor UID, MPS INTI flags, LINT#."""
    return struct.pack("<BBBHB", TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, MPS_INTI_CONFORMS, LINT1)


def build_madt(num_cpus: int) -> bytes:
    """The MADT with a blank 36-byte header, which ``tables`` fills in and checksums.

    vCPU i has APIC ID i and processor UID i, so the IOAPIC takes the first free APIC ID, ``num_cpus``.
    """
    if not 1 <= num_cpus < ALL_PROCESSORS:
        raise ValueError(f"MADT: {num_cpus} vCPUs do not fit 8-bit APIC IDs")
    entries = [_local_apic(i) for i in range(num_cpus)]
    entries += [_io_apic(num_cpus), _source_override(TIMER_IRQ, TIMER_GSI), _local_apic_nmi()]
    return bytes(HEADER_SIZE) + struct.pack("<II", LAPIC_ADDR, FLAG_PCAT_COMPAT) + b"".join(entries)
