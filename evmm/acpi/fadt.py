"""The FADT (signature "FACP") of a hardware-reduced ACPI machine: ACPI 6.5 §5.2.9 (the "FADT Format" table).

Hardware-reduced ACPI (§4.1) has no fixed PM1/GPE/PM-timer blocks, no SCI and no FACS, so most of the table
is zero.  What remains is where the DSDT is, the reset register, the sleep control/status registers that
replace PM1 (§4.8.3.7) and the boot architecture flags.  Offsets below are from the start of the table.
"""

from __future__ import annotations

import struct

from evmm.arch.x86.layout import (
    ACPI_PM_BASE,
    ACPI_PM_RESET,
    ACPI_PM_SLEEP_CONTROL,
    ACPI_PM_SLEEP_STATUS,
    ACPI_RESET_VALUE,
)

SIGNATURE = b"FACP"
REVISION = 6  # ACPI 6.5: FADT major version 6 ...
MINOR_REVISION = 5  # ... minor version 5
LENGTH = 276

# Field offsets, ACPI 6.5 §5.2.9 "FADT Format".
DSDT_OFFSET = 40
IAPC_BOOT_ARCH_OFFSET = 109
FLAGS_OFFSET = 112
RESET_REG_OFFSET = 116
RESET_VALUE_OFFSET = 128
MINOR_VERSION_OFFSET = 131
X_DSDT_OFFSET = 140
SLEEP_CONTROL_REG_OFFSET = 244
SLEEP_STATUS_REG_OFFSET = 256
HYPERVISOR_VENDOR_OFFSET = 268

# IA-PC boot architecture flags, ACPI 6.5 §5.2.9.3.
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5

# Fixed feature flags, ACPI 6.5 §5.2.9 "Fixed ACPI Description Table Fixed Feature Flags".
#
# PWR_BUTTON and SLP_BUTTON are *set*: per the spec a one means "the power button is handled as a control
# method device" (and for SLP_BUTTON, "no sleep button, or a control-method one").  A zero would claim a
# fixed-hardware button, which hardware-reduced ACPI does not have; Linux would then invent a second,
# dead "Power Button (FF)" device next to our PNP0C0C one (drivers/acpi/scan.c, acpi_bus_scan_fixed()).
FLAG_PWR_BUTTON = 1 << 4
FLAG_SLP_BUTTON = 1 << 5
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20
FLAGS = FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP | FLAG_HW_REDUCED_ACPI

# Generic Address Structure (ACPI 6.5 §5.2.3.2): space id, bit width, bit offset, access size, address.
GAS_SYSTEM_MEMORY = 0
GAS_ACCESS_BYTE = 1
_GAS = struct.Struct("<BBBBQ")

HYPERVISOR_VENDOR = b"EVMM"


def _byte_register(address: int) -> bytes:
    """An 8-bit register in system memory, accessed a byte at a time."""
    return _GAS.pack(GAS_SYSTEM_MEMORY, 8, 0, GAS_ACCESS_BYTE, address)


def build_fadt(*, dsdt_addr: int, i8042: bool, rtc: bool) -> bytes:
    """The FADT with a blank 36-byte header, which ``tables`` fills in and checksums.

    FIRMWARE_CTRL/X_FIRMWARE_CTRL stay zero: a hardware-reduced platform has no FACS (§5.2.10), and SCI_INT
    stays zero because there is no SCI; the GED brings its own interrupt.
    """
    if not 0 < dsdt_addr < 1 << 32:
        raise ValueError(f"DSDT address {dsdt_addr:#x} must be below 4 GiB for the 32-bit DSDT field")
    boot_arch = BOOT_ARCH_VGA_NOT_PRESENT
    if i8042:
        boot_arch |= BOOT_ARCH_8042
    if not rtc:
        boot_arch |= BOOT_ARCH_CMOS_RTC_NOT_PRESENT  # else Linux registers rtc_cmos at port 0x70 anyway

    table = bytearray(LENGTH)
    struct.pack_into("<I", table, DSDT_OFFSET, dsdt_addr)
    struct.pack_into("<H", table, IAPC_BOOT_ARCH_OFFSET, boot_arch)
    struct.pack_into("<I", table, FLAGS_OFFSET, FLAGS)
    table[RESET_REG_OFFSET : RESET_REG_OFFSET + _GAS.size] = _byte_register(ACPI_PM_BASE + ACPI_PM_RESET)
    table[RESET_VALUE_OFFSET] = ACPI_RESET_VALUE
    table[MINOR_VERSION_OFFSET] = MINOR_REVISION
    # X_DSDT wins over DSDT when non-zero (§5.2.9); both hold the same address so ACPICA sees no mismatch.
    struct.pack_into("<Q", table, X_DSDT_OFFSET, dsdt_addr)
    sleep_control = _byte_register(ACPI_PM_BASE + ACPI_PM_SLEEP_CONTROL)
    table[SLEEP_CONTROL_REG_OFFSET : SLEEP_CONTROL_REG_OFFSET + _GAS.size] = sleep_control
    sleep_status = _byte_register(ACPI_PM_BASE + ACPI_PM_SLEEP_STATUS)
    table[SLEEP_STATUS_REG_OFFSET : SLEEP_STATUS_REG_OFFSET + _GAS.size] = sleep_status
    # Hypervisor Vendor Identity (FADT 6.3+): an 8-byte identifier, "EVMM" padded with NULs.
    table[HYPERVISOR_VENDOR_OFFSET:LENGTH] = HYPERVISOR_VENDOR.ljust(8, b"\0")
    return bytes(table)
