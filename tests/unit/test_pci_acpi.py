"""The standard board's ACPI: MCFG, the DSDT's PCI0 (resources, _PRT, _OSC, hotplug slots) and its ECAM
reservation, read back through the independent parser and disassembled and recompiled by iasl."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from evmm.acpi import aml
from evmm.acpi.mcfg import EcamWindow
from evmm.acpi.pci import PciHostAcpi
from evmm.acpi.tables import AcpiConfig, build_acpi_tables
from evmm.arch.x86 import layout
from tests.unit import acpi_parse as ap
from tests.unit.test_acpi_tables import IASL, _iasl, dump

GiB = 1 << 30
PCI = PciHostAcpi(
    ecam=EcamWindow(0xE000_0000, last_bus=0),
    mmio32=(0xC000_0000, 0x2000_0000),
    mmio64=layout.pci_mmio64_window(6 * GiB),
    intx_gsis=(16, 17, 18, 19, 20, 21, 22, 23),
    hotplug_base=0xFEB0_2000,
)


def standard(pci: PciHostAcpi = PCI, cpus: int = 2) -> ap.Dump:
    return dump(build_acpi_tables(AcpiConfig(num_cpus=cpus, pci=pci)))


def devices(pci: PciHostAcpi = PCI) -> dict[str, ap.Node]:
    return ap.devices(ap.decode_aml(standard(pci).tables["DSDT"]))


def method(device: ap.Node, name: str) -> ap.Node:
    (found,) = [c for c in device.children if c.kind == "Method" and c.name == name]
    return found


def integer(value: int) -> ap.Node:
    return ap.Node("Integer", value=value)


# --- MCFG (PCI Firmware 3.3 §4.1.2) ---


def test_the_xsdt_lists_an_mcfg_with_one_ecam_window() -> None:
    d = standard()
    assert sorted(d.tables) == ["APIC", "DSDT", "FACP", "MCFG"]
    mcfg = d.tables["MCFG"]
    assert mcfg.revision == 1 and len(mcfg.data) == 36 + 8 + 16
    base, segment, first, last = struct.unpack_from("<QHBB", mcfg.data, 44)
    assert (base, segment, first, last) == (0xE000_0000, 0, 0, 0)
    assert mcfg.data[36:44] == bytes(8) and mcfg.data[56:60] == bytes(4)


def test_the_microvm_table_set_has_no_mcfg_and_no_pci0() -> None:
    d = dump(build_acpi_tables(AcpiConfig(num_cpus=1)))
    assert "MCFG" not in d.tables
    assert not any(p.startswith("\\_SB_.PCI0") for p in ap.devices(ap.decode_aml(d.tables["DSDT"])))


# --- PCI0 ---


def test_pci0_is_a_pcie_root_bridge_on_segment_0_bus_0() -> None:
    pci0 = devices()["\\_SB_.PCI0"]
    assert ap.hardware_id(pci0) == "PNP0A08"
    cid = ap.named(pci0, "_CID")
    assert cid is not None and isinstance(cid.value, int) and ap.decode_eisa_id(cid.value) == "PNP0A03"
    assert [ap.named(pci0, n) for n in ("_SEG", "_BBN", "_UID")] == [integer(0)] * 3
    assert ap.named(pci0, "_ADR") is None  # identified by its _HID (ACPI 6.5 §6.1)


def test_pci0_resources_are_the_bus_range_config_ports_io_windows_and_two_memory_windows() -> None:
    resources = ap.current_resources(devices()["\\_SB_.PCI0"])
    producer = 0b1100  # producer, positive decode, minimum and maximum fixed (ACPI 6.5 §6.4.3.5.1)
    assert resources == [
        ap.AddressRange(16, 2, producer, 0, 0, 0, 0, 0, 1),  # bus 0 only
        ap.IoPort(True, 0xCF8, 0xCF8, 1, 8),
        ap.AddressRange(16, 1, producer, 0x3, 0, 0, 0xCF7, 0, 0xCF8),  # EntireRange
        ap.AddressRange(16, 1, producer, 0x3, 0, 0xD00, 0xFFFF, 0, 0xF300),
        ap.AddressRange(32, 0, producer, 0x1, 0, 0xC000_0000, 0xDFFF_FFFF, 0, 0x2000_0000),  # RW, uncached
        ap.AddressRange(
            64, 0, producer, 0x3, 0, 7 * GiB, 39 * GiB - 1, 0, 32 * GiB
        ),  # RW, cacheable; RAM ends at 7 GiB
    ]


def test_the_64_bit_window_starts_above_ram() -> None:
    for mem in (256 << 20, 3 * GiB, 3 * GiB + (2 << 20), 6 * GiB):
        ram_end = max(gpa + size for gpa, size in layout.ram_layout(mem))
        base, size = layout.pci_mmio64_window(mem)
        assert base >= max(ram_end, 4 * GiB) and base % GiB == 0 and size == 32 * GiB


def test_the_ecam_window_is_reserved_by_a_motherboard_resource_device() -> None:
    mres = devices()["\\_SB_.MRES"]
    assert ap.hardware_id(mres) == "PNP0C02"
    assert ap.current_resources(mres) == [ap.FixedMemory32(True, 0xE000_0000, 1 << 20)]


def test_prt_routes_every_slot_pin_to_its_swizzled_ioapic_input() -> None:
    prt = ap.named(devices()["\\_SB_.PCI0"], "_PRT")
    assert prt is not None and prt.kind == "Package"
    entries = [tuple(e.value for e in entry.children) for entry in prt.children]
    # INTx pin p (0 = INTA#) of device d to GSI 16 + (d + p) mod 8, as PCI-to-PCI Bridge Architecture 1.2
    # §9.1 swizzles them; Source 0 means the Source Index is a GSI (ACPI 6.5 §6.2.13).
    assert entries == [((d << 16) | 0xFFFF, p, 0, 16 + (d + p) % 8) for d in range(1, 32) for p in range(4)]


def test_osc_checks_the_pci_uuid_and_masks_native_hotplug() -> None:
    osc = method(devices()["\\_SB_.PCI0"], "_OSC")
    assert osc.value == 4  # four arguments, not serialized
    create_cdw1, if_uuid, else_, ret = osc.children
    assert create_cdw1 == ap.Node("CreateDWordField", "CDW1", children=[ap.Node("Arg", value=3), integer(0)])
    predicate, create_cdw3, grant, revision, masked, store = if_uuid.children
    uuid_buffer = bytes.fromhex("5b4ddb33f71f1c409657 7441c03dd766".replace(" ", ""))  # ToUUID's byte order
    assert predicate == ap.Node(
        "LEqual", children=[ap.Node("Arg", value=0), ap.Node("Buffer", value=uuid_buffer)]
    )
    assert create_cdw3.name == "CDW3" and create_cdw3.children[1] == integer(8)
    # Granted: PME (bit 2), AER (3), PCIe capability (4); never PCIe native (0) or SHPC (1) hotplug.
    assert grant == ap.Node(
        "And", children=[ap.Node("NameRef", "CDW3"), integer(0x1C), ap.Node("Local", value=0)]
    )
    assert revision.children[1] == ap.Node(
        "Or", children=[ap.Node("NameRef", "CDW1"), integer(0x08), ap.Node("NameRef", "CDW1")]
    )
    assert masked.children[1].children[1] == integer(0x10)
    assert revision.children[0] == ap.Node(
        "LNot", children=[ap.Node("LEqual", children=[ap.Node("Arg", value=1), integer(1)])]
    )
    assert store == ap.Node("Store", children=[ap.Node("Local", value=0), ap.Node("NameRef", "CDW3")])
    assert else_.kind == "Else" and else_.children[0].children[1] == integer(0x04)
    assert ret == ap.Node("Return", children=[ap.Node("Arg", value=3)])


# --- ACPI hotplug ---


def test_each_hotpluggable_slot_has_an_address_a_number_and_an_eject_method() -> None:
    devs = devices()
    slots = {path: node for path, node in devs.items() if path.startswith("\\_SB_.PCI0.S")}
    assert sorted(slots) == [f"\\_SB_.PCI0.S{s:02X}_" for s in range(1, 32)]
    for s in range(1, 32):
        node = slots[f"\\_SB_.PCI0.S{s:02X}_"]
        assert ap.named(node, "_ADR") == integer(s << 16) and ap.named(node, "_SUN") == integer(s)
        ej0 = method(node, "_EJ0")
        assert ej0.value == 1 and ej0.children == [
            ap.Node("Store", children=[integer(1 << s), ap.Node("NameRef", "B0EJ")])
        ]


def test_pcnt_notifies_arrivals_and_eject_requests_from_the_hotplug_registers() -> None:
    pci0 = devices()["\\_SB_.PCI0"]
    region = next(c for c in pci0.children if c.kind == "OperationRegion")
    assert (region.name, region.value, [c.value for c in region.children]) == ("PHPR", 0, [0xFEB0_2000, 0x10])
    fields = next(c for c in pci0.children if c.kind == "Field")
    assert fields.value == 0x43  # DWordAcc, NoLock, WriteAsZeros
    assert [(u.name, u.value) for u in fields.children] == [("PCIU", 32), ("PCID", 32), ("B0EJ", 32)]
    pcnt = method(pci0, "PCNT")
    assert pcnt.value == 0x08  # no arguments, serialized: UP and DOWN are read once each
    read_up, read_down, *ifs = pcnt.children
    assert read_up == ap.Node("Store", children=[ap.Node("NameRef", "PCIU"), ap.Node("Local", value=0)])
    assert read_down == ap.Node("Store", children=[ap.Node("NameRef", "PCID"), ap.Node("Local", value=1)])
    expected = []
    for s in range(1, 32):
        for local, notification in ((0, 1), (1, 3)):  # Device Check, Eject Request (ACPI 6.5 §5.6.6)
            test = ap.Node("And", children=[ap.Node("Local", value=local), integer(1 << s)])
            notify = ap.Node("Notify", children=[ap.Node("NameRef", f"S{s:02X}_"), integer(notification)])
            expected.append(ap.Node("If", children=[test, notify]))
    assert ifs == expected


def test_the_ged_calls_pcnt_on_a_pci_hotplug_event() -> None:
    evt = method(devices()["\\_SB_.GED_"], "_EVT")
    _, power, pci = evt.children
    event = ap.Node("And", children=[ap.Node("Local", value=0), integer(2)])
    assert pci == ap.Node(
        "If",
        children=[ap.Node("LEqual", children=[event, integer(2)]), ap.Node("NameRef", "\\_SB_.PCI0.PCNT")],
    )
    assert power.children[1].kind == "Notify"


def test_without_hotplug_registers_there_are_no_slots_and_the_ged_ignores_pci() -> None:
    pci = PciHostAcpi(PCI.ecam, PCI.mmio32, PCI.mmio64, PCI.intx_gsis, hotplug_base=None)
    devs = devices(pci)
    assert not any(p.startswith("\\_SB_.PCI0.S") for p in devs)
    assert [c.name for c in devs["\\_SB_.PCI0"].children if c.kind == "Method"] == ["_OSC"]
    assert len(method(devs["\\_SB_.GED_"], "_EVT").children) == 2


def test_the_standard_table_set_fits_the_reserved_window() -> None:
    tables = build_acpi_tables(AcpiConfig(num_cpus=layout.MAX_VCPUS, com2=True, pci=PCI))
    assert layout.ACPI_TABLES_ADDR + len(tables.blob) <= layout.ACPI_TABLES_END


# --- the new AML, byte for byte from ACPI 6.5 §20 and §6.4.3.5 ---


def test_new_aml_encodings() -> None:
    assert aml.If(1, (aml.Return(0),), orelse=(aml.Return(1),)).to_aml() == bytes.fromhex(
        "a004 01 a400 a103 a401"
    )
    assert aml.Or(aml.Local(0), 4, aml.Local(1)).to_aml() == bytes.fromhex("7d 60 0a04 61")
    assert aml.LNot(aml.Arg(1)).to_aml() == bytes.fromhex("92 69")
    assert aml.CreateDWordField(aml.Arg(3), 8, "CDW3").to_aml() == bytes.fromhex("8a 6b 0a08") + b"CDW3"
    qword = aml.memory_window(0x1_0000_0000, 0x1_FFFF_FFFF, 64, aml.Cacheability.CACHEABLE).to_bytes()
    assert qword[:6] == bytes([0x8A, 43, 0, 0, 0b1100, 0b011])
    assert struct.unpack_from("<5Q", qword, 6) == (0, 0x1_0000_0000, 0x1_FFFF_FFFF, 0, 0x1_0000_0000)
    word = aml.word_bus_number(0, 0xFF).to_bytes()
    assert word == bytes([0x88, 13, 0, 2, 0b1100, 0]) + struct.pack("<5H", 0, 0, 0xFF, 0, 0x100)
    with pytest.raises(ValueError, match="bad 32-bit range"):
        aml.memory_window(0, 1 << 32, 32, aml.Cacheability.NON_CACHEABLE).to_bytes()


# --- iasl (ACPICA) ---


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_and_recompiles_the_standard_dsdt(tmp_path: Path) -> None:
    d = standard()
    dsdt = d.tables["DSDT"].data
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    _iasl(tmp_path, "-d", "dsdt.dat")
    asl = (tmp_path / "dsdt.dsl").read_text()
    for expected in (
        "Device (PCI0)",
        'Name (_HID, EisaId ("PNP0A08")',
        'Name (_CID, EisaId ("PNP0A03")',
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadWrite,",
        "0x00000001C0000000, // Range Minimum",
        "Name (_PRT, Package (0x7C)",
        'If ((Arg0 == ToUUID ("33db4d5b-1ff7-401c-9657-7441c03dd766") /* PCI Host Bridge Device */))',
        "Local0 = (CDW3 & 0x1C)",
        "CDW1 |= 0x10",
        "OperationRegion (PHPR, SystemMemory, 0xFEB02000, 0x10)",
        "Field (PHPR, DWordAcc, NoLock, WriteAsZeros)",
        "Device (S1F)",
        "Name (_SUN, 0x1F)",
        "B0EJ = 0x80000000",
        "Method (PCNT, 0, Serialized)",
        "Notify (S1F, 0x03) // Eject Request",
        "\\_SB.PCI0.PCNT ()",
        'Name (_HID, EisaId ("PNP0C02")',
    ):
        assert expected in asl, expected
    _iasl(tmp_path, "-oa", "-p", "again", "dsdt.dsl")
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_decodes_the_mcfg(tmp_path: Path) -> None:
    (tmp_path / "MCFG.dat").write_bytes(standard().tables["MCFG"].data)
    _iasl(tmp_path, "-d", "MCFG.dat")
    mcfg = " ".join((tmp_path / "MCFG.dsl").read_text().split())
    for expected in (
        "Base Address : 00000000E0000000",
        "Segment Group Number : 0000",
        "Start Bus Number : 00",
        "End Bus Number : 00",
    ):
        assert expected in mcfg, expected
