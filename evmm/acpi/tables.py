"""The ACPI tables of the microvm board as one blob: RSDP, XSDT, FADT, MADT, DSDT (ACPI 6.5 §5.2).

The blob is written at ``layout.ACPI_TABLES_ADDR``, with the RSDP first so that a kernel that is not told where
it is still finds it by scanning 0xE0000-0xFFFFF on 16-byte boundaries (§5.2.5.1).  Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from evmm.acpi import dsdt, fadt, madt
from evmm.acpi.aml import AmlObject
from evmm.acpi.dsdt import VirtioMmioDevice
from evmm.arch.x86.layout import (
    ACPI_TABLES_ADDR,
    ACPI_TABLES_END,
    IOAPIC_PINS,
    IRQ_ACPI_GED,
    IRQ_COM1,
    IRQ_COM2,
    IRQ_KEYBOARD,
    IRQ_RTC,
    MAX_VCPUS,
    VIRTIO_MMIO_MAX_SLOTS,
)
from evmm.errors import ConfigError
from evmm.record import record

if TYPE_CHECKING:
    from evmm.acpi.pci import PciHostAcpi

__all__ = ["AcpiConfig", "AcpiTables", "VirtioMmioDevice", "build_acpi_tables"]

OEM_ID = b"EVMM  "
OEM_TABLE_ID = b"EVMMVM  "
OEM_REVISION = 1
CREATOR_ID = b"EVMM"
CREATOR_REVISION = 1

RSDP_REVISION = 2  # ACPI 2.0+: the RSDP carries the XSDT address and an extended checksum
RSDP_LENGTH = 36
XSDT_REVISION = 1
TABLE_ALIGN = 16

# System description table header, ACPI 6.5 §5.2.6: signature, length, revision, checksum, OEM id,
# OEM table id, OEM revision, creator id, creator revision.
_HEADER = struct.Struct("<4sIBB6s8sI4sI")
# RSDP, §5.2.5.3: signature, checksum (first 20 bytes), OEM id, revision, RSDT address, length,
# XSDT address, extended checksum (all 36 bytes), 3 reserved.
_RSDP = struct.Struct("<8sB6sBIIQB3x")
# IRQs 0 (8254) and 2 (8259 cascade) are never free for a virtio device; the others only when unused.
_RESERVED_IRQS = frozenset({0, 2})


@record(frozen=True)
class AcpiConfig:
    num_cpus: int
    virtio_devices: tuple[VirtioMmioDevice, ...] = ()
    com1: bool = True
    com2: bool = False
    rtc: bool = True
    i8042: bool = True
    ged: bool = True
    pci: PciHostAcpi | None = None  # the standard board: PCI0 in the DSDT, and an MCFG
    vmgenid_addr: int | None = None  # a VMGenID device pointing there (needs the GED to be notified)


@record(frozen=True)
class AcpiTables:
    rsdp_addr: int
    blob: bytes  # written at the ``base`` given to build_acpi_tables; the RSDP is at its start


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero modulo 256 (§5.2.5.3, §5.2.6)."""
    return -sum(data) & 0xFF


def _seal(signature: bytes, revision: int, table: bytes) -> bytes:
    """Fill in the blank header of ``table`` and its checksum."""
    sealed = bytearray(table)
    _HEADER.pack_into(
        sealed,
        0,
        signature,
        len(sealed),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    sealed[9] = _checksum(sealed)
    return bytes(sealed)


def _rsdp(xsdt_addr: int) -> bytes:
    rsdp = bytearray(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, RSDP_LENGTH, xsdt_addr, 0))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    return bytes(rsdp)


def _xsdt(entries: list[int]) -> bytes:
    return _seal(b"XSDT", XSDT_REVISION, bytes(_HEADER.size) + struct.pack(f"<{len(entries)}Q", *entries))


def _validate(config: AcpiConfig) -> None:
    if not 1 <= config.num_cpus <= MAX_VCPUS:
        raise ConfigError(f"invalid vCPU count {config.num_cpus}: use 1 to {MAX_VCPUS}")
    if len(config.virtio_devices) > VIRTIO_MMIO_MAX_SLOTS:
        raise ConfigError(
            f"{len(config.virtio_devices)} virtio-mmio devices is more than the {VIRTIO_MMIO_MAX_SLOTS} slots"
        )
    legacy = {
        irq
        for irq, used in (
            (IRQ_COM1, config.com1),
            (IRQ_COM2, config.com2),
            (IRQ_RTC, config.rtc),
            (IRQ_KEYBOARD, config.i8042),
            (IRQ_ACPI_GED, config.ged),
        )
        if used
    }
    taken = set(_RESERVED_IRQS | legacy)
    for index, dev in enumerate(config.virtio_devices):
        if not (dev.base >= 0 and dev.size > 0 and dev.base + dev.size <= 1 << 32):
            raise ConfigError(
                f"virtio-mmio device {index}: window {dev.base:#x}+{dev.size:#x} is not below 4 GiB"
            )
        if not 0 <= dev.gsi < IOAPIC_PINS or dev.gsi in taken:
            raise ConfigError(
                f"virtio-mmio device {index}: GSI {dev.gsi} is out of range or already in use;"
                f" give it a free IOAPIC pin below {IOAPIC_PINS}"
            )
        taken.add(dev.gsi)


def build_acpi_tables(config: AcpiConfig, base: int = ACPI_TABLES_ADDR) -> AcpiTables:
    """Build the tables for a blob to be written at guest-physical ``base``; the RSDP is at ``base``."""
    _validate(config)
    if base % TABLE_ALIGN or not 0 <= base < 1 << 32:
        raise ValueError(f"ACPI tables base {base:#x} must be 16-byte aligned and below 4 GiB")

    extra: list[AmlObject] = []
    pci_hotplug = None
    more: list[tuple[bytes, int, bytes]] = []
    if config.pci is not None:
        # Imported for the standard board only: a microvm VMM keeps 0.3 MiB less of PCI's AML (and uuid).
        from evmm.acpi import mcfg
        from evmm.acpi.pci import PCNT_PATH, pci_host_devices

        extra = pci_host_devices(config.pci)
        pci_hotplug = PCNT_PATH if config.pci.hotplug_base is not None else None
        more.append((mcfg.SIGNATURE, mcfg.REVISION, mcfg.build_mcfg([config.pci.ecam])))
    dsdt_table = dsdt.build_dsdt(
        virtio_devices=config.virtio_devices,
        com1=config.com1,
        com2=config.com2,
        rtc=config.rtc,
        i8042=config.i8042,
        ged=config.ged,
        extra=extra,
        pci_hotplug=pci_hotplug,
        vmgenid_addr=config.vmgenid_addr,
    )
    madt_table = madt.build_madt(config.num_cpus)

    # Lay out: RSDP, XSDT, FADT, MADT, DSDT, then any more tables (MCFG), each 16-byte aligned.
    sizes = [RSDP_LENGTH, _HEADER.size + (2 + len(more)) * 8, fadt.LENGTH, len(madt_table), len(dsdt_table)]
    offsets: list[int] = []
    end = 0
    for size in sizes + [len(table) for _, _, table in more]:
        start = -(-end // TABLE_ALIGN) * TABLE_ALIGN
        offsets.append(start)
        end = start + size
    rsdp_at, xsdt_at, fadt_at, madt_at, dsdt_at, *more_at = (base + off for off in offsets)

    fadt_table = fadt.build_fadt(dsdt_addr=dsdt_at, i8042=config.i8042, rtc=config.rtc)
    parts = [
        _rsdp(xsdt_at),
        _xsdt([fadt_at, madt_at, *more_at]),
        _seal(fadt.SIGNATURE, fadt.REVISION, fadt_table),
        _seal(madt.SIGNATURE, madt.REVISION, madt_table),
        _seal(dsdt.SIGNATURE, dsdt.REVISION, dsdt_table),
        *(_seal(signature, revision, table) for signature, revision, table in more),
    ]
    blob = bytearray(end)
    for offset, part in zip(offsets, parts, strict=True):
        blob[offset : offset + len(part)] = part
    if len(blob) > ACPI_TABLES_END - ACPI_TABLES_ADDR:
        raise ConfigError(
            f"the ACPI tables need {len(blob)} bytes, more than the {ACPI_TABLES_END - ACPI_TABLES_ADDR} reserved"
        )
    return AcpiTables(rsdp_addr=rsdp_at, blob=bytes(blob))
