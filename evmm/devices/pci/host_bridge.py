"""The host bridge at 00:00.0: a type-0 function with no BARs, class 06/00 (PCI Code and ID Assignment
Specification, "Host bridge").  Linux's pci_sanity_check looks for one on bus 0 before trusting
configuration mechanism #1.

The IDs are QEMU's generic PCIe host bridge (vendor 0x1B36, device 0x0008: Red Hat's QEMU range), which
Linux binds no chipset quirk to; a q35 MCH ID would invite Intel-specific probing of registers this board
does not have.
"""

from __future__ import annotations

from evmm.devices.pci.function import PciFunction, PciIds

HOST_BRIDGE_IDS = PciIds(vendor=0x1B36, device=0x0008, class_code=0x060000)


class HostBridge(PciFunction):
    def __init__(self) -> None:
        super().__init__("host-bridge", HOST_BRIDGE_IDS)
