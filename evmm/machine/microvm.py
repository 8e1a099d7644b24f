"""The ``microvm`` board: vCPUs, flat RAM, legacy ISA devices, virtio-mmio, described by ACPI (no PCI).

The only place that wires parts together, with the pieces both boards share (board.py): KVM objects, guest
memory and device registers in the region tree, devices and their interrupt lines, firmware tables and the
boot state.  Devices get what they need (an interrupt line, a callback); none of them reaches back into the
machine: those that stop it get the ``Lifecycle`` made before them, which the machine
attaches to once built.  What the machine itself acts on it gets as typed handles (``Devices``).
"""

from __future__ import annotations

import asyncio
import os

from evmm.acpi.tables import AcpiConfig, VirtioMmioDevice, build_acpi_tables
from evmm.address_space import Io
from evmm.arch.x86 import layout
from evmm.devices.acpi_pm import AcpiPm
from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.mmio import VirtioMmio
from evmm.devices.vmgenid import GENERATION_ID_SIZE, VmGenId
from evmm.errors import ConfigError
from evmm.kvm import Vm
from evmm.log import log
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
from evmm.machine.hotplug import HotplugSlot, make_empty_blk, make_empty_net
from evmm.machine.interrupts import IrqfdInterrupt, KvmNotifyRegistrar
from evmm.machine.lifecycle import Lifecycle
from evmm.machine.machine import Machine
from evmm.memory import GuestMemory
from evmm.startup import Laps


def _make_hotplug_slots(config: MachineConfig) -> list[HotplugSlot]:
    slots = [
        HotplugSlot(f"hp-blk{i}", "blk", make_empty_blk(f"hp-blk{i}")) for i in range(config.hotplug_blk)
    ]
    if config.hotplug_net:
        slots += [
            HotplugSlot(f"hp-net{i}", "net", make_empty_net(f"hp-net{i}", i, config.hotplug_vhost))
            for i in range(config.hotplug_net)
        ]
    return slots


def _virtio_transports(
    b: Build,
    vm: Vm,
    memory: GuestMemory,
    spaces: Spaces,
    loop: asyncio.AbstractEventLoop,
    devices: list[tuple[str, VirtioDevice]],
) -> list[VirtioMmio]:
    if len(devices) > len(layout.VIRTIO_IRQS):
        raise ConfigError(
            f"too many virtio devices ({len(devices)}); the microvm board has {len(layout.VIRTIO_IRQS)} slots"
        )
    notify = KvmNotifyRegistrar(vm)
    transports = []
    for index, (name, device) in enumerate(devices):
        base = layout.virtio_mmio_slot(index)
        irq = IrqfdInterrupt(vm, layout.VIRTIO_IRQS[index])
        b.closers.append(irq.close)
        t = VirtioMmio(device, memory, irq, loop, base, notify=notify, on_error=log.warning)
        b.closers.append(t.close)
        spaces.memory.root.add(Io(f"virtio-{name}", layout.VIRTIO_MMIO_SIZE, t), base)
        transports.append(t)
    return transports


def _virtio_cmdline_words(transports: list[VirtioMmio]) -> list[str]:
    """virtio_mmio.device=<size>@<base>:<irq> (Documentation/admin-guide/kernel-parameters.txt)."""
    return [
        f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE // 1024}K@{t.base:#x}:{layout.VIRTIO_IRQS[i]}"
        for i, t in enumerate(transports)
    ]


def _vmgenid(memory: GuestMemory, acpi_pm: AcpiPm) -> VmGenId:
    """The VM generation ID's device, notified through the GED's event register."""
    return VmGenId(memory, layout.VMGENID_ADDR, lambda: acpi_pm.ged_event(layout.ACPI_GED_EVENT_VMGENID))


def build_microvm(
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    *,
    stdio: tuple[int, int] | None = None,
    kvm_path: str = "/dev/kvm",
    memory: GuestMemory | None = None,
    boot: bool = True,
    laps: Laps | None = None,
) -> Machine:
    """Build the machine; ``boot``: load the kernel and firmware tables and set the boot vCPU's entry state.

    A restore (evmm/snapshot/restore.py) passes the snapshot's ``memory`` and ``boot=False``: RAM already
    holds the kernel, the tables and everything since, and the vCPUs and devices get their saved state next.
    """

    def body(b: Build, board: Base, lifecycle: Lifecycle) -> Machine:
        slots = _make_hotplug_slots(config)
        virtio = make_virtio_devices(config, stdio) + [(slot.id, slot.device) for slot in slots]
        with board.spaces.memory.transaction():
            transports = _virtio_transports(b, board.vm, board.memory, board.spaces, loop, virtio)
        vmgenid = _vmgenid(board.memory, board.legacy.acpi_pm)
        b.laps.lap("devices")

        rsdp_addr = 0
        if boot:
            acpi_devices = tuple(
                VirtioMmioDevice(t.base, layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQS[i])
                for i, t in enumerate(transports)
            )
            acpi = AcpiConfig(num_cpus=config.cpus, virtio_devices=acpi_devices, vmgenid_addr=vmgenid.addr)
            tables = build_acpi_tables(acpi)
            board.memory.write(layout.ACPI_TABLES_ADDR, tables.blob)
            vmgenid.write(os.urandom(GENERATION_ID_SIZE))
            rsdp_addr = tables.rsdp_addr
            b.laps.lap("acpi")

        def defaults(tsc_khz: int) -> list[str]:
            words = default_cmdline(tsc_khz, console_name(config))
            acpi_off = "acpi=off" in config.cmdline.split()
            if config.virtio_cmdline or (config.virtio_cmdline is None and acpi_off):
                words += _virtio_cmdline_words(transports)
            return words

        started = boot_vcpus(b, board.vm, config, board.memory, board.legacy, rsdp_addr, defaults, boot=boot)
        devices = Devices(
            acpi_pm=board.legacy.acpi_pm,
            i8042=board.legacy.i8042,
            virtio_console=virtio_console(virtio),
            slots=slots,
            serial=board.legacy.serial,
            rtc=board.legacy.rtc,
            boot_timer=board.legacy.boot_timer,
            vmgenid=vmgenid,
            transports=transports,
        )
        return assemble(b, board, config, lifecycle, loop, console, started, devices)

    return build(config, loop, console, kvm_path, body, memory, laps)
