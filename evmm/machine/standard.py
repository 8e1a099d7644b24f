"""The ``standard`` board: vCPUs, region-tree memory, the PC's legacy devices and a PCI system (issue 18).

What the microvm board has, plus: a PCI host bridge with ECAM and configuration mechanism #1, BARs decoded
through the 32-bit and 64-bit holes of the region tree, MSI-X routed in KVM, ACPI hotplug through the GED,
and ACPI tables that describe all of it (MCFG, PCI0).  docs/standard-board.md has the layout and the choices.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from evmm.acpi.mcfg import EcamWindow
from evmm.acpi.pci import PciHostAcpi
from evmm.acpi.tables import AcpiConfig, build_acpi_tables
from evmm.address_space import AddressSpace, Alias, Container, Io, Ram
from evmm.address_space.listener import BusListener, KvmListener
from evmm.arch.x86 import layout
from evmm.arch.x86.boot import load_linux, setup_boot_vcpu, setup_vcpu
from evmm.arch.x86.irqroute import pc_gsi_routes
from evmm.arch.x86.mptable import build_mptable
from evmm.devices.acpi_pm import AcpiPm
from evmm.devices.bus import Bus
from evmm.devices.legacy.serial import Serial
from evmm.devices.pci import hotplug
from evmm.devices.pci.host_bridge import HostBridge
from evmm.devices.pci.root import CONFIG_IO_PORTS, ConfigIo, Ecam, PciRoot
from evmm.errors import KvmError
from evmm.kvm import Kvm
from evmm.kvm.uart_fast import UartFastPath
from evmm.loop.console import ConsoleIO
from evmm.machine.cmdline import merge_cmdline
from evmm.machine.config import MachineConfig, check_cpus
from evmm.machine.machine import Machine, MachineParts
from evmm.machine.microvm import _Build, _legacy_devices, default_cmdline
from evmm.machine.msi import GsiRouting
from evmm.memory import GuestMemory
from evmm.record import record


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
    """Bus 0 and where its BARs decode: the PCI memory and I/O spaces, shown through the board's holes."""

    root: PciRoot
    hotplug: hotplug.PciHotplugRegisters


def _address_spaces(
    vm_listeners: tuple[KvmListener, KvmListener], mmio: Bus, pio: Bus
) -> tuple[AddressSpace, AddressSpace]:
    system = AddressSpace("memory", Container("system", 1 << 64))
    ports = AddressSpace("io", Container("ports", 1 << 16))
    system.add_listener(vm_listeners[0])
    system.add_listener(BusListener(mmio))
    ports.add_listener(vm_listeners[1])
    ports.add_listener(BusListener(pio))
    return system, ports


def _pci(
    system: AddressSpace,
    ports: AddressSpace,
    config: MachineConfig,
    on_hotplug_event: Callable[[], None],
    on_eject: Callable[[int], None],
) -> PciSystem:
    pci_mem = Container("pci-memory", 1 << 64)
    pci_io = Container("pci-io", 1 << 16)
    hole64, size64 = layout.pci_mmio64_window(config.memory)
    system.root.add(
        Alias("pci-hole32", pci_mem, layout.PCI_MMIO32_BASE, layout.PCI_MMIO32_SIZE), layout.PCI_MMIO32_BASE
    )
    system.root.add(Alias("pci-hole64", pci_mem, hole64, size64), hole64)
    # The I/O windows of PCI0's _CRS; below the legacy devices, which the board places above them.
    ports.root.add(Alias("pci-io-low", pci_io, 0, 0xCF8), 0, priority=-1)
    ports.root.add(Alias("pci-io-high", pci_io, 0xD00, 0x10000 - 0xD00), 0xD00, priority=-1)
    root = PciRoot(pci_mem, pci_io)
    ecam = Ecam(root, layout.PCI_ECAM_BUSES)
    system.root.add(Io("pci-ecam", ecam.size, ecam), layout.PCI_ECAM_BASE)
    ports.root.add(Io("pci-config", CONFIG_IO_PORTS, ConfigIo(root)), layout.PCI_CONFIG_IO_PORT)
    regs = hotplug.PciHotplugRegisters(on_hotplug_event, on_eject)
    system.root.add(Io("pci-hotplug", hotplug.SIZE, regs), layout.PCI_HOTPLUG_BASE)
    root.plug(0, HostBridge())
    return PciSystem(root, regs)


def build_standard(
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    *,
    stdio: tuple[int, int] | None = None,
    kvm_path: str = "/dev/kvm",
) -> Machine:
    b = _Build(Kvm(kvm_path))
    machine_ref: list[Machine] = []

    def stop(code: int, message: str) -> None:
        if machine_ref:
            machine_ref[0].stop(code, message)

    def boot_marker() -> None:
        if machine_ref:
            machine_ref[0].record_boot_marker()

    try:
        kvm = b.kvm
        kvm.require()
        check_cpus(config.cpus, kvm.max_vcpus())
        vm = b.vm = kvm.create_vm()
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        try:
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        except KvmError:
            pass  # only Intel hosts implement it
        vm.create_irqchip()
        routing = GsiRouting(vm, pc_gsi_routes())
        vm.create_pit2()

        memory = b.memory = GuestMemory.anonymous(layout.ram_layout(config.memory))
        pio, mmio = Bus("pio"), Bus("mmio")
        system, ports = _address_spaces((KvmListener(vm), KvmListener(vm, pio=True)), mmio, pio)
        with system.transaction(), ports.transaction():
            for i, region in enumerate(memory.regions):
                system.root.add(Ram(f"ram{i}", region.buffer), region.gpa)
        devices = _legacy_devices(b, vm, pio, mmio, loop, console, stop, boot_marker)
        acpi_pm = devices["acpi_pm"]
        assert isinstance(acpi_pm, AcpiPm)
        with system.transaction(), ports.transaction():
            pci = _pci(
                system,
                ports,
                config,
                lambda: acpi_pm.ged_event(layout.ACPI_GED_EVENT_PCI_HOTPLUG),
                lambda slot: None,
            )
        devices["pci"] = pci
        devices["gsi_routing"] = routing

        tables = build_acpi_tables(AcpiConfig(num_cpus=config.cpus, pci=pci_acpi(config)))
        memory.write(layout.ACPI_TABLES_ADDR, tables.blob)
        memory.write(layout.MPTABLE_ADDR, build_mptable(config.cpus))

        vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
        console_name = "hvc0" if config.console is not None and config.console.kind == "stdio" else "ttyS0"
        defaults = [w for w in default_cmdline(vcpus[0].get_tsc_khz(), console_name) if w != "pci=off"]
        cmdline = merge_cmdline(config.cmdline, defaults)
        plan = load_linux(memory, config.kernel, config.initrd, cmdline, tables.rsdp_addr)
        supported = kvm.supported_cpuid()
        fast = devices["serial_fast"]
        assert isinstance(fast, UartFastPath)
        for v in vcpus:
            setup_vcpu(v, supported, config.cpus)
            v.attach_fast_path(fast)
        setup_boot_vcpu(vcpus[0], plan)

        parts = MachineParts(
            config=config,
            kvm=kvm,
            vm=vm,
            memory=memory,
            vcpus=vcpus,
            pio=pio,
            mmio=mmio,
            cmdline=cmdline,
            devices=devices,
            closers=b.closers,
        )
        machine = Machine(parts, loop)
        machine_ref.append(machine)
        if console is not None:
            serial = devices["serial"]
            assert isinstance(serial, Serial)
            console.attach_input(serial)
        return machine
    except BaseException:
        b.abort()
        raise
