"""The devices a running machine reaches, as typed handles the builder fills (Firecracker's device managers).

The builder holds every device while it wires them; ``Machine`` keeps only what it acts on: the ACPI power
button, the i8042 for Ctrl-Alt-Del, the virtio console (whose size follows the terminal), the hot-replace
slots, the standard board's PCI devices.  A board without one of them leaves it None, and the machine says so in one
line when asked for it.  The rest of the board's devices are here too, for the snapshot alone
(evmm/snapshot/devices.py saves and restores every device's state).
"""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING

from evmm.record import record

if TYPE_CHECKING:  # types only: a machine without a virtio console never imports its module
    from evmm.devices.acpi_pm import AcpiPm
    from evmm.devices.boot_timer import BootTimer
    from evmm.devices.legacy.i8042 import I8042
    from evmm.devices.legacy.rtc import Rtc
    from evmm.devices.legacy.serial import Serial
    from evmm.devices.virtio.console import VirtioConsole
    from evmm.devices.virtio.mmio import VirtioMmio
    from evmm.devices.vmgenid import VmGenId
    from evmm.machine.hotplug import HotplugSlot
    from evmm.machine.pci_devices import PciDevices


@record
class Devices:
    acpi_pm: AcpiPm | None = None
    i8042: I8042 | None = None
    virtio_console: VirtioConsole | None = None  # --virtio-console's device
    slots: list[HotplugSlot] = field(default_factory=list)
    pci: PciDevices | None = None  # the standard board's PCI devices (hotplug, the topology query-vm shows)
    # For the snapshot only:
    serial: Serial | None = None
    rtc: Rtc | None = None
    boot_timer: BootTimer | None = None
    vmgenid: VmGenId | None = None
    transports: list[VirtioMmio] = field(default_factory=list)  # in slot order
