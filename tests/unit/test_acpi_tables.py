"""The microvm ACPI table set, read back through the independent parser in ``acpi_parse`` and through iasl."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.acpi.tables import AcpiConfig, AcpiTables, VirtioMmioDevice, build_acpi_tables
from evmm.arch.x86.layout import (
    ACPI_PM_BASE,
    ACPI_PM_GED_EVENT,
    ACPI_RESET_VALUE,
    ACPI_TABLES_ADDR,
    ACPI_TABLES_END,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    MAX_VCPUS,
    VIRTIO_IRQS,
    VIRTIO_MMIO_MAX_SLOTS,
    VIRTIO_MMIO_SIZE,
    virtio_mmio_slot,
)
from evmm.errors import ConfigError
from tests.unit import acpi_parse as ap

pytestmark = pytest.mark.unit

VIRTIO = (
    VirtioMmioDevice(virtio_mmio_slot(0), VIRTIO_MMIO_SIZE, 16),
    VirtioMmioDevice(virtio_mmio_slot(1), VIRTIO_MMIO_SIZE, 17),
    VirtioMmioDevice(virtio_mmio_slot(5), 0x2000, 5),
)
# GSIs a virtio device may take when COM1, RTC, i8042 and the GED are all present.
FREE_GSIS = tuple(g for g in VIRTIO_IRQS if g not in (1, 4, 8, 9))


def dump(tables: AcpiTables, base: int = ACPI_TABLES_ADDR) -> ap.Dump:
    return ap.parse(tables.blob, base, tables.rsdp_addr)


def dsdt_devices(config: AcpiConfig) -> dict[str, ap.Node]:
    return ap.devices(ap.decode_aml(dump(build_acpi_tables(config)).tables["DSDT"]))


# --- Structure: RSDP -> XSDT -> tables ---


@pytest.mark.parametrize("num_cpus", [1, 32])
def test_table_set_parses_with_valid_checksums(num_cpus: int) -> None:
    tables = build_acpi_tables(AcpiConfig(num_cpus=num_cpus, virtio_devices=VIRTIO))
    d = dump(tables)  # the parser checks every signature, length and checksum
    assert tables.rsdp_addr == ACPI_TABLES_ADDR
    assert (d.rsdp.revision, d.rsdp.length, d.rsdp.rsdt_address) == (2, 36, 0)
    assert d.rsdp.oem_id == b"EVMM  "
    assert sorted(d.tables) == ["APIC", "DSDT", "FACP"]
    assert [d.xsdt.u(o, 8) for o in (36, 44)] == [d.tables["FACP"].address, d.tables["APIC"].address]
    for table in [d.xsdt, *d.tables.values()]:
        assert (table.oem_id, table.oem_table_id, table.creator_id) == (b"EVMM  ", b"EVMMVM  ", b"EVMM")
        assert table.address % 16 == 0
    assert {t.signature: t.revision for t in [d.xsdt, *d.tables.values()]} == {
        "XSDT": 1,
        "FACP": 6,
        "APIC": 6,
        "DSDT": 2,  # 64-bit AML integers
    }


def test_tables_do_not_overlap_and_fit_the_reserved_window() -> None:
    biggest = AcpiConfig(
        num_cpus=MAX_VCPUS,
        com2=True,
        virtio_devices=tuple(
            VirtioMmioDevice(virtio_mmio_slot(i), VIRTIO_MMIO_SIZE, g) for i, g in enumerate(FREE_GSIS[1:])
        ),
    )
    tables = build_acpi_tables(biggest)
    d = dump(tables)
    spans = sorted((t.address, t.address + len(t.data)) for t in [d.xsdt, *d.tables.values()])
    spans.insert(0, (tables.rsdp_addr, tables.rsdp_addr + 36))
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert ACPI_TABLES_ADDR + len(tables.blob) <= ACPI_TABLES_END
    assert spans[-1][1] == ACPI_TABLES_ADDR + len(tables.blob)


def test_checksums_are_real() -> None:
    """Flipping any byte of a table makes the parser refuse it: the checksum covers the whole table."""
    tables = build_acpi_tables(AcpiConfig(num_cpus=2))
    d = dump(tables)
    for table in d.tables.values():
        blob = bytearray(tables.blob)
        blob[table.address - ACPI_TABLES_ADDR + len(table.data) - 1] ^= 0x40
        with pytest.raises(ap.ParseError, match="checksum"):
            ap.parse(bytes(blob), ACPI_TABLES_ADDR, tables.rsdp_addr)
    blob = bytearray(tables.blob)
    blob[30] ^= 1  # inside the XSDT address: only the extended RSDP checksum covers it
    with pytest.raises(ap.ParseError, match="RSDP"):
        ap.parse(bytes(blob), ACPI_TABLES_ADDR, tables.rsdp_addr)


def test_other_base_moves_every_pointer() -> None:
    base = 0x0010_0000
    tables = build_acpi_tables(AcpiConfig(num_cpus=1), base=base)
    d = dump(tables, base)
    assert tables.rsdp_addr == base
    fadt = ap.decode_fadt(d.tables["FACP"])
    assert fadt.x_dsdt == fadt.dsdt == d.tables["DSDT"].address
    assert base < d.tables["DSDT"].address < base + len(tables.blob)


def test_misaligned_base_is_refused() -> None:
    with pytest.raises(ValueError, match="16-byte aligned"):
        build_acpi_tables(AcpiConfig(num_cpus=1), base=ACPI_TABLES_ADDR + 8)


# --- FADT ---


def test_fadt_fields() -> None:
    d = dump(build_acpi_tables(AcpiConfig(num_cpus=4)))
    assert len(d.tables["FACP"].data) == 276
    fadt = ap.decode_fadt(d.tables["FACP"])
    assert fadt.minor_version == 5
    assert fadt.flags & (1 << 20), "HW_REDUCED_ACPI"
    assert fadt.flags & (1 << 10), "RESET_REG_SUP"
    # PWR_BUTTON/SLP_BUTTON = 1: a control-method power button (the GED's PWRB), no fixed-hardware buttons.
    assert fadt.flags & (1 << 4) and fadt.flags & (1 << 5)
    assert fadt.flags == (1 << 20) | (1 << 10) | (1 << 5) | (1 << 4)
    assert fadt.reset_reg == ap.Gas(0, 8, 0, 1, ACPI_PM_BASE + 2)
    assert fadt.reset_value == ACPI_RESET_VALUE
    assert fadt.sleep_control == ap.Gas(0, 8, 0, 1, ACPI_PM_BASE + 0)
    assert fadt.sleep_status == ap.Gas(0, 8, 0, 1, ACPI_PM_BASE + 1)
    assert fadt.dsdt == fadt.x_dsdt == d.tables["DSDT"].address
    assert fadt.iapc_boot_arch == 0b110  # 8042 present, VGA not present
    assert fadt.hypervisor_vendor == b"EVMM\0\0\0\0"
    # Hardware-reduced: no FACS, no SCI, no fixed PM/GPE blocks.
    assert (fadt.firmware_ctrl, fadt.x_firmware_ctrl, fadt.sci_int) == (0, 0, 0)
    assert not any(fadt.legacy_blocks) and not any(fadt.x_legacy_blocks)


def test_fadt_boot_flags_follow_the_devices() -> None:
    fadt = ap.decode_fadt(dump(build_acpi_tables(AcpiConfig(1, i8042=False, rtc=False))).tables["FACP"])
    assert fadt.iapc_boot_arch == (1 << 2) | (1 << 5)  # VGA not present, CMOS RTC not present, no 8042


# --- MADT ---


@pytest.mark.parametrize("num_cpus", [1, 2, 32])
def test_madt(num_cpus: int) -> None:
    madt = ap.decode_madt(dump(build_acpi_tables(AcpiConfig(num_cpus=num_cpus))).tables["APIC"])
    assert (madt.lapic_address, madt.flags) == (LAPIC_ADDR, 1)  # PCAT_COMPAT
    assert madt.entries == [
        *(ap.LocalApic(uid=i, apic_id=i, flags=1) for i in range(num_cpus)),
        ap.IoApic(apic_id=num_cpus, address=IOAPIC_ADDR, gsi_base=0),
        ap.SourceOverride(bus=0, source=0, gsi=2, flags=0),
        ap.LocalApicNmi(uid=0xFF, flags=0, lint=1),
    ]


# --- DSDT ---


def test_default_dsdt_devices() -> None:
    devs = dsdt_devices(AcpiConfig(num_cpus=1))
    assert sorted(devs) == sorted(f"\\_SB_.{n}" for n in ("COM1", "RTC_", "KBD_", "GED_", "PWRB"))
    com1 = devs["\\_SB_.COM1"]
    assert ap.hardware_id(com1) == "PNP0501"
    assert ap.named(com1, "_HID") == ap.Node("Integer", value=0x0105D041)  # an EISAID, not a string
    assert ap.named(com1, "_UID") == ap.Node("Integer", value=1)
    assert ap.current_resources(com1) == [ap.IoPort(True, 0x3F8, 0x3F8, 1, 8), ap.Irq((4,), None)]
    rtc = devs["\\_SB_.RTC_"]
    assert ap.hardware_id(rtc) == "PNP0B00"
    assert ap.current_resources(rtc) == [ap.IoPort(True, 0x70, 0x70, 1, 2), ap.Irq((8,), None)]
    kbd = devs["\\_SB_.KBD_"]
    assert ap.hardware_id(kbd) == "PNP0303"
    assert ap.current_resources(kbd) == [
        ap.IoPort(True, 0x60, 0x60, 1, 1),
        ap.IoPort(True, 0x64, 0x64, 1, 1),
        ap.Irq((1,), None),
    ]
    pwrb = devs["\\_SB_.PWRB"]
    assert ap.named(pwrb, "_HID") == ap.Node("String", value="PNP0C0C")
    assert ap.named(pwrb, "_UID") == ap.Node("Integer", value=0)


def test_s5_package_at_root() -> None:
    tree = ap.decode_aml(dump(build_acpi_tables(AcpiConfig(num_cpus=1))).tables["DSDT"])
    s5 = dict(ap.walk(tree))["\\_S5_"]
    assert s5.kind == "Name"
    (package,) = s5.children
    assert package.kind == "Package"
    assert [(e.kind, e.value) for e in package.children] == [("Integer", 5), ("Integer", 0)]


def test_com2() -> None:
    com2 = dsdt_devices(AcpiConfig(num_cpus=1, com2=True))["\\_SB_.COM2"]
    assert ap.hardware_id(com2) == "PNP0501"
    assert ap.named(com2, "_UID") == ap.Node("Integer", value=2)
    assert ap.current_resources(com2) == [ap.IoPort(True, 0x2F8, 0x2F8, 1, 8), ap.Irq((3,), None)]


def test_everything_off_leaves_an_empty_system_bus() -> None:
    config = AcpiConfig(num_cpus=1, com1=False, rtc=False, i8042=False, ged=False)
    tree = ap.decode_aml(dump(build_acpi_tables(config)).tables["DSDT"])
    assert [(p, n.kind) for p, n in ap.walk(tree)] == [("\\_S5_", "Name"), ("\\_SB_", "Scope")]


def test_virtio_devices() -> None:
    devs = dsdt_devices(AcpiConfig(num_cpus=1, virtio_devices=VIRTIO))
    for index, dev in enumerate(VIRTIO):
        node = devs[f"\\_SB_.VR{index:02X}"]
        assert ap.named(node, "_HID") == ap.Node("String", value="LNRO0005")
        assert ap.named(node, "_UID") == ap.Node("Integer", value=index)
        assert ap.named(node, "_CCA") is None  # not for x86
        assert ap.current_resources(node) == [
            ap.FixedMemory32(writable=True, base=dev.base, length=dev.size),
            ap.ExtInterrupt(
                consumer=True,
                edge=True,
                active_low=False,
                shared=False,
                wake_capable=False,
                interrupts=(dev.gsi,),
            ),
        ]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(FREE_GSIS), unique=True, min_size=1, max_size=len(FREE_GSIS)), st.data())
def test_any_virtio_set_round_trips(gsis: list[int], data: st.DataObject) -> None:
    slots = data.draw(
        st.lists(
            st.integers(0, VIRTIO_MMIO_MAX_SLOTS - 1), unique=True, min_size=len(gsis), max_size=len(gsis)
        )
    )
    virtio = tuple(
        VirtioMmioDevice(virtio_mmio_slot(s), VIRTIO_MMIO_SIZE, g) for s, g in zip(slots, gsis, strict=True)
    )
    devs = dsdt_devices(AcpiConfig(num_cpus=1, virtio_devices=virtio))
    found = {
        (res[0].base, res[0].length, res[1].interrupts)
        for path, node in devs.items()
        if path.startswith("\\_SB_.VR")
        for res in [ap.current_resources(node)]
        if isinstance(res[0], ap.FixedMemory32) and isinstance(res[1], ap.ExtInterrupt)
    }
    assert found == {(d.base, d.size, (d.gsi,)) for d in virtio}


def test_generic_event_device() -> None:
    ged = dsdt_devices(AcpiConfig(num_cpus=1))["\\_SB_.GED_"]
    assert ap.hardware_id(ged) == "ACPI0013"
    assert ap.current_resources(ged) == [ap.ExtInterrupt(True, True, False, False, False, (9,))]
    region, fields, evt = (c for c in ged.children if c.kind != "Name")
    assert (region.kind, region.name, region.value) == ("OperationRegion", "EREG", 0)  # SystemMemory
    assert [(c.kind, c.value) for c in region.children] == [
        ("Integer", ACPI_PM_BASE + ACPI_PM_GED_EVENT),
        ("Integer", 1),
    ]
    assert (fields.kind, fields.name, fields.value) == ("Field", "EREG", 0x01)  # ByteAcc, NoLock, Preserve
    assert [(u.name, u.value) for u in fields.children] == [("ESEL", 8)]
    assert (evt.kind, evt.name, evt.value) == ("Method", "_EVT", 0x09)  # 1 argument, Serialized
    store, if_ = evt.children
    assert store == ap.Node("Store", children=[ap.Node("NameRef", "ESEL"), ap.Node("Local", value=0)])
    predicate, notify = if_.children
    local0_and_1 = ap.Node("And", children=[ap.Node("Local", value=0), ap.Node("Integer", value=1)])
    assert predicate == ap.Node("LEqual", children=[local0_and_1, ap.Node("Integer", value=1)])
    assert notify == ap.Node(
        "Notify", children=[ap.Node("NameRef", "\\_SB_.PWRB"), ap.Node("Integer", value=0x80)]
    )


# --- Configuration errors ---


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (AcpiConfig(num_cpus=0), "vCPU count 0"),
        (AcpiConfig(num_cpus=MAX_VCPUS + 1), "vCPU count 33"),
        (AcpiConfig(1, virtio_devices=(VirtioMmioDevice(0xFFFFF000, 0x2000, 16),)), "not below 4 GiB"),
        (AcpiConfig(1, virtio_devices=(VirtioMmioDevice(0xD0000000, 0, 16),)), "not below 4 GiB"),
        (AcpiConfig(1, virtio_devices=(VirtioMmioDevice(0xD0000000, 0x1000, 24),)), "GSI 24"),
        (AcpiConfig(1, virtio_devices=(VirtioMmioDevice(0xD0000000, 0x1000, 4),)), "GSI 4"),  # COM1's
        (AcpiConfig(1, virtio_devices=(VirtioMmioDevice(0xD0000000, 0x1000, 2),)), "GSI 2"),
        (AcpiConfig(1, virtio_devices=(VIRTIO[0], VIRTIO[0])), "device 1: GSI 16"),
        (AcpiConfig(1, virtio_devices=(VIRTIO[0],) * (VIRTIO_MMIO_MAX_SLOTS + 1)), "more than the 64 slots"),
    ],
)
def test_bad_configs(config: AcpiConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_acpi_tables(config)
    assert "\n" not in str(info.value)


def test_gsi_of_a_disabled_device_is_free() -> None:
    config = AcpiConfig(1, com1=False, virtio_devices=(VirtioMmioDevice(0xD0000000, 0x1000, 4),))
    assert ap.current_resources(dsdt_devices(config)["\\_SB_.VR00"])[1] == ap.ExtInterrupt(
        True, True, False, False, False, (4,)
    )


# --- iasl (ACPICA), an independent implementation ---

IASL = shutil.which("iasl")


def _iasl(workdir: Path, *args: str) -> str:
    assert IASL is not None
    result = subprocess.run(
        [IASL, *args], cwd=workdir, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # iasl exits 0 after a bad checksum or a repaired name, so its messages are the verdict.
    for word in ("Error", "Warning", "Incorrect checksum", "Remark"):
        assert word not in output.replace("0 Errors, 0 Warnings, 0 Remarks", ""), output
    return output


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_and_recompiles_the_dsdt(tmp_path: Path) -> None:
    config = AcpiConfig(num_cpus=2, com2=True, virtio_devices=VIRTIO)
    dsdt = dump(build_acpi_tables(config)).tables["DSDT"].data
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    _iasl(tmp_path, "-d", "dsdt.dat")
    asl = (tmp_path / "dsdt.dsl").read_text()
    for expected in (
        "Name (_S5, Package (0x02)",
        "Device (COM1)",
        "Device (COM2)",
        'EisaId ("PNP0501")',
        'EisaId ("PNP0B00")',
        'EisaId ("PNP0303")',
        "Device (VR02)",
        'Name (_HID, "LNRO0005")',
        "Memory32Fixed (ReadWrite,\n                    0xD0005000,         // Address Base\n"
        "                    0x00002000,         // Address Length",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                {\n"
        "                    0x00000005,",
        'Name (_HID, "ACPI0013"',
        "OperationRegion (EREG, SystemMemory, 0xFEB00003, One)",
        "Field (EREG, ByteAcc, NoLock, Preserve)",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.PWRB, 0x80)",
        'Name (_HID, "PNP0C0C"',
    ):
        assert expected in asl, expected
    # Compiling iasl's ASL back (-oa: no name-path optimizations) gives the very same AML.
    _iasl(tmp_path, "-oa", "-p", "again", "dsdt.dsl")
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]


def _fields(dsl: Path) -> str:
    """iasl's data-table listing as one line, without the "[offset offset size]" columns."""
    return " ".join(re.sub(r"\[[0-9A-F]+h [0-9]+ +[0-9]+\]", " ", dsl.read_text()).split())


@pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_decodes_fadt_and_madt(tmp_path: Path) -> None:
    d = dump(build_acpi_tables(AcpiConfig(num_cpus=3)))
    for signature in ("FACP", "APIC"):
        (tmp_path / f"{signature}.dat").write_bytes(d.tables[signature].data)
        _iasl(tmp_path, "-d", f"{signature}.dat")
    fadt = _fields(tmp_path / "FACP.dsl")
    for expected in (
        "FADT Minor Revision : 05",
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Control Method Power Button (V1) : 1",
        "8042 Present on ports 60/64 (V2) : 1",
        "VGA Not Present (V4) : 1",
        "Value to cause reset : 42",
        "Address : 00000000FEB00002",  # reset register
        "Address : 00000000FEB00000",  # sleep control
        "Address : 00000000FEB00001",  # sleep status
        f"DSDT Address : {d.tables['DSDT'].address:016X}",
        "Hypervisor ID : 000000004D4D5645",  # "EVMM", little-endian
    ):
        assert expected in fadt, expected
    madt = _fields(tmp_path / "APIC.dsl")
    assert madt.count("[Processor Local APIC]") == 3
    for expected in (
        "Local Apic Address : FEE00000",
        "PC-AT Compatibility : 1",
        "I/O Apic ID : 03 Reserved : 00 Address : FEC00000 Interrupt : 00000000",
        "[Interrupt Source Override]",
        "Bus : 00 Source : 00 Interrupt : 00000002",
        "[Local APIC NMI]",
        "Interrupt Input LINT : 01",
    ):
        assert expected in madt, expected
