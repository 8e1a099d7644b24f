"""The ``standard`` board: vCPUs, region-tree memory, the PC's legacy devices and a PCI system (issue 18).

What the microvm board has (board.py), plus: a PCI host bridge with ECAM and configuration mechanism #1, BARs
decoded through the 32-bit and 64-bit holes of the region tree, MSI-X routed in KVM, ACPI hotplug through
the GED, and ACPI tables that describe all of it (MCFG, PCI0).  docs/standard-board.md has the layout and
the choices.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from evmm.acpi.mcfg import EcamWindow
from evmm.acpi.pci import PciHostAcpi
from evmm.acpi.tables import AcpiConfig, build_acpi_tables
from evmm.address_space import Alias, Container, Io
from evmm.arch.x86 import layout
from evmm.devices.pci import hotplug
from evmm.devices.pci.host_bridge import HostBridge
from evmm.devices.pci.intx import SharedLine
from evmm.devices.pci.root import CONFIG_IO_PORTS, ConfigIo, Ecam, PciRoot
from evmm.loop.console import ConsoleIO
from evmm.machine.board import (
    Base,
    Build,
    Spaces,
    assemble,
    boot_vcpus,
    build,
    console_name,
    default_cmdline,
    make_virtio_devices,
    virtio_console,
)
from evmm.machine.config import MachineConfig
from evmm.machine.devices import Devices
from evmm.machine.interrupts import KvmIrqLine
from evmm.machine.lifecycle import Lifecycle
from evmm.machine.machine import Machine
from evmm.machine.pci_devices import BarAllocator, PciDevices
from evmm.record import record
from evmm.startup import Laps


def pci_acpi(config: MachineConfig) -> PciHostAcpi:
    return PciHostAcpi(
        ecam=EcamWindow(layout.PCI_ECAM_BASE, last_bus=layout.PCI_ECAM_BUSES - 1),
        mmio32=(layout.PCI_MMIO32_BASE, layout.PCI_MMIO32_SIZE),
        mmio64=layout.pci_mmio64_window(config.memory),
        intx_gsis=layout.PCI_INTX_GSIS,
        hotplug_base=layout.PCI_HOTPLUG_BASE,
    )


@record
class PciSystem:
    """Bus 0 and the hotplug registers; its BARs decode in the PCI memory and I/O spaces, which the board
    shows through its holes."""

    root: PciRoot
    hotplug: hotplug.PciHotplugRegisters


def pci_system(spaces: Spaces, config: MachineConfig, on_hotplug_event: Callable[[], None]) -> PciSystem:
    """Bus 0 with the host bridge, ECAM, 0xCF8 and the hotplug registers, in the board's address spaces."""
    pci_mem = Container("pci-memory", 1 << 64)
    pci_io = Container("pci-io", 1 << 16)
    hole64, size64 = layout.pci_mmio64_window(config.memory)
    memory, ports = spaces.memory.root, spaces.io.root
    with spaces.memory.transaction(), spaces.io.transaction():
        memory.add(
            Alias("pci-hole32", pci_mem, layout.PCI_MMIO32_BASE, layout.PCI_MMIO32_SIZE),
            layout.PCI_MMIO32_BASE,
        )
        memory.add(Alias("pci-hole64", pci_mem, hole64, size64), hole64)
        # PCI0's I/O windows (its _CRS), either side of 0xCF8; the ISA ports in the low one are the board's.
        ports.add(Alias("pci-io-low", pci_io, 0, 0xCF8), 0)
        ports.add(Alias("pci-io-high", pci_io, 0xD00, 0x10000 - 0xD00), 0xD00)
        root = PciRoot(pci_mem, pci_io)
        ecam = Ecam(root, layout.PCI_ECAM_BUSES)
        memory.add(Io("pci-ecam", ecam.size, ecam), layout.PCI_ECAM_BASE)
        ports.add(Io("pci-config", CONFIG_IO_PORTS, ConfigIo(root)), layout.PCI_CONFIG_IO_PORT)
        regs = hotplug.PciHotplugRegisters(on_hotplug_event)
        memory.add(Io("pci-hotplug", hotplug.SIZE, regs), layout.PCI_HOTPLUG_BASE)
        root.plug(0, HostBridge())
    return PciSystem(root, regs)


def build_standard(
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    *,
    stdio: tuple[int, int] | None = None,
    kvm_path: str = "/dev/kvm",
    laps: Laps | None = None,
) -> Machine:
    def body(b: Build, board: Base, lifecycle: Lifecycle) -> Machine:
        vm, memory, acpi_pm = board.vm, board.memory, board.legacy.acpi_pm
        intx = {gsi: SharedLine(KvmIrqLine(vm, gsi)) for gsi in layout.PCI_INTX_GSIS}
        pci = pci_system(board.spaces, config, lambda: acpi_pm.ged_event(layout.ACPI_GED_EVENT_PCI_HOTPLUG))
        bars = BarAllocator(
            (layout.PCI_MMIO32_BASE, layout.PCI_MMIO32_SIZE), layout.pci_mmio64_window(config.memory)
        )
        pci_devices = PciDevices(
            pci.root, pci.hotplug, vm, board.routing, memory, loop, bars, intx, layout.PCI_INTX_GSIS
        )
        b.closers.append(pci_devices.close)
        virtio = make_virtio_devices(config, stdio)
        with board.spaces.memory.transaction():
            for name, device in virtio:
                pci_devices.add(name, device)
        b.laps.lap("devices")
        tables = build_acpi_tables(AcpiConfig(num_cpus=config.cpus, pci=pci_acpi(config)))
        memory.write(layout.ACPI_TABLES_ADDR, tables.blob)
        b.laps.lap("acpi")
        boot = boot_vcpus(
            b,
            vm,
            config,
            memory,
            board.legacy,
            tables.rsdp_addr,
            lambda tsc_khz: default_cmdline(tsc_khz, console_name(config), pci=True),
        )
        devices = Devices(
            acpi_pm=acpi_pm, i8042=board.legacy.i8042, virtio_console=virtio_console(virtio), pci=pci_devices
        )
        return assemble(b, board, config, lifecycle, loop, console, boot, devices)

    return build(config, loop, console, kvm_path, body, laps=laps)
