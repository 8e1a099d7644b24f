"""The standard board's PCI host bridge in the DSDT: ``\\_SB.PCI0`` and the motherboard resource that reserves
ECAM, as AML.

PCI0 (ACPI 6.5 §6.1, PCI Firmware Specification 3.3 §4.5): _HID PNP0A08 (a PCI Express root bridge, so Linux
uses ECAM through MCFG) with _CID PNP0A03 (and no _ADR: a device has a _HID or an _ADR, §6.1); _SEG/_BBN/_UID 0; _CRS with the bus range, the 0xCF8 ports, the I/O
windows either side of them, a 32-bit memory window below the ECAM and a 64-bit one above RAM; _PRT mapping
each slot's INTx pins straight to IOAPIC inputs (§6.2.13, no link devices); and _OSC, which keeps PCIe
native hotplug (and SHPC) with the firmware because the board hotplugs through ACPI, granting the OS what it
asks of PME, AER and the PCIe capability (as QEMU's q35 does with ACPI hotplug on).

ACPI hotplug (Cloud Hypervisor's scheme): one Device per hotpluggable slot, with _ADR, _SUN and an _EJ0
that writes the slot's bit to the EJECT register, and PCNT, which the GED's _EVT calls on a PCI hotplug event:
it reads the UP and DOWN registers (each read clears them) and notifies each slot (1: Device Check, a device
arrived; 3: Eject Request, ACPI 6.5 §5.6.6).  The registers are devices/pci/hotplug.py's.
"""

from __future__ import annotations

import uuid

from evmm.acpi.aml import (
    IO,
    AccessType,
    AmlObject,
    And,
    Arg,
    Cacheability,
    CreateDWordField,
    Device,
    Field,
    FieldUnit,
    If,
    LEqual,
    LNot,
    Local,
    LockRule,
    Memory32Fixed,
    Method,
    Name,
    NameRef,
    Notify,
    OperationRegion,
    Or,
    Package,
    RegionSpace,
    ResourceTemplate,
    Return,
    Store,
    UpdateRule,
    eisa_id,
    memory_window,
    word_bus_number,
    word_io,
)
from evmm.acpi.aml import Buffer as AmlBuffer
from evmm.acpi.mcfg import EcamWindow
from evmm.devices.pci.hotplug import REG_DOWN, REG_EJECT, REG_UP
from evmm.devices.pci.hotplug import SIZE as HOTPLUG_SIZE
from evmm.devices.pci.intx import intx_gsi
from evmm.record import record

PCI0_PATH = "\\_SB.PCI0"
PCNT_PATH = PCI0_PATH + ".PCNT"

# PCI Firmware Specification 3.3 §4.5.1: the _OSC UUID of PCI host bridges, in ToUUID's byte order.
PCI_OSC_UUID = uuid.UUID("33DB4D5B-1FF7-401C-9657-7441C03DD766").bytes_le
# _OSC status (DWORD 1) bits, ACPI 6.5 §6.2.11: unrecognised UUID, unrecognised revision, capabilities masked.
OSC_UNKNOWN_UUID = 1 << 2
OSC_UNKNOWN_REVISION = 1 << 3
OSC_MASKED = 1 << 4
# Control field (DWORD 3) bits, PCI Firmware 3.3 §4.5.1: 0 PCIe native hotplug, 1 SHPC hotplug, 2 PME,
# 3 AER, 4 PCIe capability structure.
OSC_GRANTED = (1 << 2) | (1 << 3) | (1 << 4)

NOTIFY_DEVICE_CHECK = 1
NOTIFY_EJECT_REQUEST = 3


@record(frozen=True)
class PciHostAcpi:
    """What the DSDT says of the board's PCI: windows, ECAM, INTx inputs and the hotplug registers."""

    ecam: EcamWindow
    mmio32: tuple[int, int]  # (base, size)
    mmio64: tuple[int, int]
    intx_gsis: tuple[int, ...]
    hotplug_base: int | None = None  # None: no hotplug slots
    hotplug_slots: tuple[int, ...] = tuple(range(1, 32))  # 0 is the host bridge


def _crs(pci: PciHostAcpi) -> Name:
    (lo, lo_size), (hi, hi_size) = pci.mmio32, pci.mmio64
    return Name(
        "_CRS",
        ResourceTemplate(
            (
                word_bus_number(pci.ecam.first_bus, pci.ecam.last_bus),
                IO(minimum=0xCF8, maximum=0xCF8, alignment=1, length=8),
                word_io(0x0000, 0x0CF7),
                word_io(0x0D00, 0xFFFF),
                memory_window(lo, lo + lo_size - 1, 32, Cacheability.NON_CACHEABLE),
                memory_window(hi, hi + hi_size - 1, 64, Cacheability.CACHEABLE),
            )
        ),
    )


def _prt(pci: PciHostAcpi) -> Name:
    """(slot << 16 | 0xFFFF: any function of the slot, pin 0-3, source 0 = a GSI, the GSI)."""
    entries = tuple(
        Package(((slot << 16) | 0xFFFF, pin - 1, 0, intx_gsi(slot, pin, pci.intx_gsis)))
        for slot in range(1, 32)
        for pin in (1, 2, 3, 4)
    )
    return Name("_PRT", Package(entries))


def _osc() -> Method:
    cdw1, cdw3, granted = NameRef("CDW1"), NameRef("CDW3"), Local(0)
    return Method(
        "_OSC",
        arg_count=4,
        body=(
            CreateDWordField(Arg(3), 0, "CDW1"),
            If(
                LEqual(Arg(0), AmlBuffer(PCI_OSC_UUID)),
                (
                    CreateDWordField(Arg(3), 8, "CDW3"),
                    And(cdw3, OSC_GRANTED, granted),
                    If(LNot(LEqual(Arg(1), 1)), (Or(cdw1, OSC_UNKNOWN_REVISION, cdw1),)),
                    If(LNot(LEqual(cdw3, granted)), (Or(cdw1, OSC_MASKED, cdw1),)),
                    Store(granted, cdw3),
                ),
                orelse=(Or(cdw1, OSC_UNKNOWN_UUID, cdw1),),
            ),
            Return(Arg(3)),
        ),
    )


def _hotplug(pci: PciHostAcpi, base: int) -> list[AmlObject]:
    registers: list[AmlObject] = [
        OperationRegion("PHPR", RegionSpace.SYSTEM_MEMORY, base, HOTPLUG_SIZE),
        Field(
            "PHPR",
            (FieldUnit("PCIU", 32), FieldUnit("PCID", 32), FieldUnit("B0EJ", 32)),
            access=AccessType.DWORD,
            lock=LockRule.NO_LOCK,
            update=UpdateRule.WRITE_AS_ZEROS,
        ),
    ]
    assert (REG_UP, REG_DOWN, REG_EJECT) == (0, 4, 8), "the Field above lays them out in this order"
    slots = [
        Device(
            f"S{slot:02X}",
            (
                Name("_ADR", slot << 16),
                Name("_SUN", slot),
                Method("_EJ0", arg_count=1, body=(Store(1 << slot, NameRef("B0EJ")),)),
            ),
        )
        for slot in pci.hotplug_slots
    ]
    up, down = Local(0), Local(1)
    notify: list[AmlObject] = [Store(NameRef("PCIU"), up), Store(NameRef("PCID"), down)]
    for slot in pci.hotplug_slots:
        node = NameRef(f"S{slot:02X}")
        notify.append(If(And(up, 1 << slot), (Notify(node, NOTIFY_DEVICE_CHECK),)))
        notify.append(If(And(down, 1 << slot), (Notify(node, NOTIFY_EJECT_REQUEST),)))
    return [*registers, *slots, Method("PCNT", arg_count=0, serialized=True, body=tuple(notify))]


def pci_host_devices(pci: PciHostAcpi) -> list[AmlObject]:
    """PCI0, and the PNP0C02 device whose _CRS reserves the ECAM window (Linux's is_acpi_reserved)."""
    pci0: list[AmlObject] = [
        Name("_HID", eisa_id("PNP0A08")),
        Name("_CID", eisa_id("PNP0A03")),
        Name("_SEG", pci.ecam.segment),
        Name("_BBN", pci.ecam.first_bus),
        Name("_UID", 0),
        _crs(pci),
        _prt(pci),
        _osc(),
    ]
    if pci.hotplug_base is not None:
        pci0 += _hotplug(pci, pci.hotplug_base)
    reserved = Device(
        "MRES",
        (
            Name("_HID", eisa_id("PNP0C02")),
            Name("_UID", 1),
            Name("_CRS", ResourceTemplate((Memory32Fixed(pci.ecam.base, pci.ecam.size, writable=True),))),
        ),
    )
    return [Device("PCI0", tuple(pci0)), reserved]
