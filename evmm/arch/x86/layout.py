"""The guest-physical memory map of an evmm x86_64 machine.

0x0000_0000  real-mode IVT/BDA (unused by a 64-bit boot, kept as RAM)
0x0000_0500  GDT, then IDT
0x0000_6000  PVH hvm_start_info + memory map
0x0000_7000  zero page (struct boot_params)
0x0000_8ff0  boot stack top
0x0000_9000  identity-map page tables (PML4, PDPT, 4 x PD)
0x0002_0000  kernel command line
0x0009_fc00  EBDA: MP floating pointer + MP configuration table
0x000e_0000  ACPI: RSDP, XSDT, FADT, MADT, DSDT (reserved in e820)
0x000f_f000  the VM generation ID (VMGenID, reserved in e820)
0x0010_0000  kernel (bzImage protected-mode part; ELF segments at their p_paddr)
...          RAM up to min(memory, MMIO32_START); initrd at the top of it
0xc000_0000  32-bit MMIO hole: virtio-mmio slots (microvm) or the PCI window and ECAM (standard), ACPI power
             block, IOAPIC, LAPIC
0x1_0000_0000 RAM above 4 GiB when the guest has more than MMIO32_START bytes
...          the standard board's 64-bit PCI window, from the first GiB boundary above RAM
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

GDT_ADDR = 0x500
IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories: 0xb000..0xefff, 2 MiB pages identity-mapping the first 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000  # bytes, including the NUL; the kernel's own cmdline_size may be smaller

EBDA_START = 0x9FC00
MPTABLE_ADDR = EBDA_START
LOW_RAM_END = EBDA_START  # first e820 RAM entry is [0, EBDA_START)
ACPI_TABLES_ADDR = 0xE0000  # RSDP first; the kernel also finds it here by scanning, if it must
ACPI_TABLES_END = 0xFF000
# The VM generation ID (16 bytes) the DSDT's VGEN device points at: reserved in e820, outside the tables.
VMGENID_ADDR = 0xFF000
HIMEM_START = 0x100000  # 1 MiB: where the protected-mode kernel is loaded

MMIO32_START = 0xC000_0000  # 3 GiB: RAM below this, devices from here to 4 GiB
MMIO32_END = 0x1_0000_0000
HIGH_RAM_START = MMIO32_END

# Device windows inside the 32-bit hole.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000  # one 4 KiB page per device: the virtio-mmio register file is 0x100 + config
VIRTIO_MMIO_MAX_SLOTS = 64
ACPI_PM_BASE = 0xFEB0_0000  # the hardware-reduced ACPI block (sleep control/status, reset, GED)
ACPI_PM_SIZE = 0x100
BOOT_TIMER_BASE = 0xFEB0_1000  # boot-timer marker register (like Firecracker's)
PCI_HOTPLUG_BASE = 0xFEB0_2000  # the standard board's ACPI PCI hotplug registers (devices/pci/hotplug.py)
PCI_HOTPLUG_SIZE = 0x10
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
KVM_TSS_ADDR = 0xFFFB_D000  # three pages KVM needs on Intel for real-mode emulation
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

# Interrupts (IOAPIC pins = GSIs; the in-kernel IOAPIC has 24).
IOAPIC_PINS = 24
IRQ_KEYBOARD = 1
IRQ_COM1 = 4
IRQ_COM2 = 3
IRQ_RTC = 8
IRQ_ACPI_GED = 9  # edge, for the power button event (issue: control plane)
# virtio-mmio devices take GSIs 16..23 first (never shared with ISA), then the free ISA-range pins.
VIRTIO_IRQS = (16, 17, 18, 19, 20, 21, 22, 23, 5, 6, 7, 10, 11, 12, 13, 14, 15)

MAX_VCPUS = 32

# The standard board's PCI (issue 18), in the same 32-bit hole: a 512 MiB window for BARs, then ECAM.  ECAM
# (and the MCFG, and PCI0's bus range) covers bus 0 alone, the only bus: Linux sets pcibios_last_bus from the
# MCFG and then probes every device of every bus up to it through 0xCF8/0xCFC, two exits a probe; with 256
# buses that is 16384 exits, minutes in the KVM test host (measured: the boot stalled in pci_subsys_init).
PCI_MMIO32_BASE = 0xC000_0000
PCI_MMIO32_SIZE = 0x2000_0000
PCI_ECAM_BASE = 0xE000_0000
PCI_ECAM_BUSES = 1
PCI_ECAM_SIZE = PCI_ECAM_BUSES << 20
PCI_MMIO64_SIZE = 32 * GiB
PCI_CONFIG_IO_PORT = 0xCF8
# The IOAPIC inputs INTx is swizzled over (devices/pci/intx.py); the standard board has no virtio-mmio.
PCI_INTX_GSIS = (16, 17, 18, 19, 20, 21, 22, 23)


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as ``(gpa, size)`` regions: below the 32-bit MMIO hole, and the rest above 4 GiB."""
    low = min(mem_size, MMIO32_START)
    regions = [(0, low)]
    if mem_size > low:
        regions.append((HIGH_RAM_START, mem_size - low))
    return regions


def pci_mmio64_window(mem_size: int) -> tuple[int, int]:
    """(base, size) of the 64-bit PCI window: from the first GiB boundary at or above the end of RAM."""
    ram_end = max(HIGH_RAM_START, max(gpa + size for gpa, size in ram_layout(mem_size)))
    return -(-ram_end // GiB) * GiB, PCI_MMIO64_SIZE


def virtio_mmio_slot(index: int) -> int:
    """Base address of virtio-mmio slot ``index``."""
    return VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE


# Registers of the hardware-reduced ACPI block at ACPI_PM_BASE (byte offsets; all 8-bit).  The FADT points its
# sleep control/status and reset registers here (ACPI 6.5 §4.8.3.7 and §4.8.3.6), and the Generic Event Device
# in the DSDT reads its event selector here (§5.6.9).
ACPI_PM_SLEEP_CONTROL = 0x0  # write: SLP_TYPx in bits 4:2, SLP_EN in bit 5
ACPI_PM_SLEEP_STATUS = 0x1  # read: WAK_STS in bit 7
ACPI_PM_RESET = 0x2  # write ACPI_RESET_VALUE to reset the machine
ACPI_PM_GED_EVENT = 0x3  # read: pending GED events (bit 0: power button), cleared by the read
ACPI_RESET_VALUE = 0x42
ACPI_S5_SLP_TYP = 5  # the SLP_TYPx value the DSDT's \_S5 package names
ACPI_GED_EVENT_POWER_BUTTON = 0x1
ACPI_GED_EVENT_PCI_HOTPLUG = 0x2
ACPI_GED_EVENT_VMGENID = 0x4  # a new VM generation ID: Notify(VGEN) (a restored snapshot)
