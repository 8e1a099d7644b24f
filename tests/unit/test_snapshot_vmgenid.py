"""The VM generation ID: its DSDT device (read back by the independent parser and by iasl), the GED event that
notifies it, and the device model that writes a new ID into guest RAM on restore."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from evmm.acpi.tables import AcpiConfig, build_acpi_tables
from evmm.arch.x86.layout import ACPI_GED_EVENT_VMGENID, ACPI_PM_GED_EVENT, ACPI_TABLES_ADDR, VMGENID_ADDR
from evmm.devices.acpi_pm import AcpiPm
from evmm.devices.vmgenid import VmGenId
from evmm.memory import GuestMemory
from tests.fakes.devices import CallCounter
from tests.fakes.irq import RecordingInterrupt
from tests.unit import acpi_parse as ap

ADDR = 0x123456789000


def dsdt(config: AcpiConfig) -> list[ap.Node]:
    tables = build_acpi_tables(config)
    return ap.decode_aml(ap.parse(tables.blob, ACPI_TABLES_ADDR, tables.rsdp_addr).tables["DSDT"])


def test_the_vgen_device_names_its_id_for_linux_and_the_spec() -> None:
    devices = ap.devices(dsdt(AcpiConfig(num_cpus=1, vmgenid_addr=ADDR)))
    vgen = devices["\\_SB_.VGEN"]
    assert ap.hardware_id(vgen) == "VMGENCTR"  # what drivers/virt/vmgenid.c matches
    assert ap.named(vgen, "_CID") == ap.Node("String", value="VM_Gen_Counter")
    (addr,) = (c for c in vgen.children if c.kind == "Method")
    assert (addr.name, addr.value) == ("ADDR", 0)  # no arguments, not serialized
    (ret,) = addr.children
    assert ret == ap.Node(
        "Return",
        children=[
            ap.Node(
                "Package", children=[ap.Node("Integer", value=0x56789000), ap.Node("Integer", value=0x1234)]
            )
        ],
    )


def test_the_ged_notifies_vgen_on_its_own_event_bit_only_when_there_is_one() -> None:
    def evt(config: AcpiConfig) -> ap.Node:
        ged = ap.devices(dsdt(config))["\\_SB_.GED_"]
        (method,) = (c for c in ged.children if c.kind == "Method")
        return method

    with_vgen = evt(AcpiConfig(num_cpus=1, vmgenid_addr=ADDR))
    _store, _power, vgen = with_vgen.children
    predicate, notify = vgen.children
    bit = ap.Node("Integer", value=ACPI_GED_EVENT_VMGENID)
    assert predicate == ap.Node(
        "LEqual", children=[ap.Node("And", children=[ap.Node("Local", value=0), bit]), bit]
    )
    assert notify == ap.Node(
        "Notify", children=[ap.Node("NameRef", "\\_SB_.VGEN"), ap.Node("Integer", value=0x80)]
    )
    assert len(evt(AcpiConfig(num_cpus=1)).children) == 2  # no VGEN: no branch for it
    assert "\\_SB_.VGEN" not in ap.devices(dsdt(AcpiConfig(num_cpus=1)))


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_reads_the_vgen_device(tmp_path: Path) -> None:
    tables = build_acpi_tables(AcpiConfig(num_cpus=1, vmgenid_addr=VMGENID_ADDR))
    data = ap.parse(tables.blob, ACPI_TABLES_ADDR, tables.rsdp_addr).tables["DSDT"].data
    (tmp_path / "dsdt.dat").write_bytes(data)
    out = subprocess.run(
        ["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    asl = (tmp_path / "dsdt.dsl").read_text()
    for expected in (
        "Device (VGEN)",
        'Name (_HID, "VMGENCTR")',
        'Name (_CID, "VM_Gen_Counter")',
        "Method (ADDR, 0, NotSerialized)",
        "0x000FF000,",
        "Notify (\\_SB.VGEN, 0x80)",
    ):
        assert expected in asl, expected


def test_a_new_generation_is_written_to_guest_ram_and_raises_the_ged_event() -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    ged = RecordingInterrupt()
    pm = AcpiPm(ged, CallCounter(), CallCounter())
    gen = VmGenId(mem, VMGENID_ADDR, lambda: pm.ged_event(ACPI_GED_EVENT_VMGENID))
    gen.write(b"A" * 16)
    assert mem.read(VMGENID_ADDR, 16) == b"A" * 16 and ged.count == 0  # boot: no notification
    first = gen.new_generation()
    second = gen.new_generation()
    assert first != second and len(first) == 16 and mem.read(VMGENID_ADDR, 16) == second == gen.generation
    assert ged.count == 2
    assert pm.read(ACPI_PM_GED_EVENT, 1) == ACPI_GED_EVENT_VMGENID  # what _EVT reads: VGEN, not the button
    assert pm.read(ACPI_PM_GED_EVENT, 1) == 0
    with pytest.raises(ValueError, match="16 bytes"):
        gen.write(b"short")
