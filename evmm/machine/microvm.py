"""The ``microvm`` board: vCPUs, flat RAM, legacy ISA devices, virtio-mmio, described by ACPI (no PCI).

The only place that wires parts together: KVM objects, guest memory, buses, devices and their interrupt lines,
firmware tables and the boot state.  Devices get what they need (an interrupt line, a callback); none of them
reaches back into the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from evmm import exitcodes
from evmm.acpi.tables import AcpiConfig, VirtioMmioDevice, build_acpi_tables
from evmm.arch.x86 import layout
from evmm.arch.x86.boot import load_linux, setup_boot_vcpu, setup_vcpu
from evmm.arch.x86.irqroute import pc_gsi_routes
from evmm.arch.x86.mptable import build_mptable
from evmm.devices.acpi_pm import AcpiPm
from evmm.devices.boot_timer import BootTimer
from evmm.devices.bus import Bus
from evmm.devices.legacy.debug_port import DebugPort
from evmm.devices.legacy.i8042 import I8042
from evmm.devices.legacy.rtc import Rtc
from evmm.devices.legacy.serial import Serial
from evmm.errors import KvmError
from evmm.kvm import Kvm, Vm
from evmm.loop.console import ConsoleIO
from evmm.machine.cmdline import merge_cmdline
from evmm.machine.config import MachineConfig, check_cpus
from evmm.machine.interrupts import IrqfdInterrupt, KvmIrqLine
from evmm.machine.machine import Machine, MachineParts
from evmm.memory import GuestMemory

COM1_BASE = 0x3F8
RTC_BASE = 0x70
I8042_DATA = 0x60
I8042_COMMAND = 0x64
POST_PORT = 0x80


def default_cmdline(tsc_khz: int) -> list[str]:
    """What the board adds unless the user's --append already says it.

    console=ttyS0: the UART is the console.  pci=off: the board has no PCI, don't probe config space.
    i8042.noaux: no mouse port, skip probing it.  panic=-1: a panicking guest reboots at once, so evmm exits
    instead of hanging.  tsc_early_khz: tell the kernel the TSC rate KVM gives it; under nested emulation early
    calibration can otherwise hang.
    """
    words = ["console=ttyS0", "pci=off", "i8042.noaux", "panic=-1"]
    if tsc_khz > 0:
        words.append(f"tsc_early_khz={tsc_khz}")
    return words


def _reactor_timer(
    loop: asyncio.AbstractEventLoop, fire: Callable[[], None]
) -> Callable[[float | None], None]:
    """A re-armable one-shot timer on the reactor, for device models that ask for one (the RTC)."""
    handle: list[asyncio.TimerHandle] = []

    def arm(delay: float | None) -> None:
        while handle:
            handle.pop().cancel()
        if delay is not None:
            handle.append(loop.call_later(max(delay, 0.0), fire))

    return arm


def build_microvm(
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    kvm_path: str = "/dev/kvm",
) -> Machine:
    kvm = Kvm(kvm_path)
    closers: list[Callable[[], None]] = []  # device resources, released before the VM and its memory
    vm: Vm | None = None
    memory: GuestMemory | None = None
    try:
        kvm.require()
        check_cpus(config.cpus, kvm.max_vcpus())
        vm = kvm.create_vm()
        # Intel needs these three pages below 4 GiB for real-mode emulation; on AMD they are harmless.
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        try:
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        except KvmError:
            pass  # only Intel hosts implement it
        vm.create_irqchip()
        vm.set_gsi_routing(pc_gsi_routes())
        vm.create_pit2()

        memory = GuestMemory.anonymous(layout.ram_layout(config.memory))
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.gpa, region.buffer)

        pio, mmio = Bus("pio"), Bus("mmio")
        machine_ref: list[Machine] = []

        def stop(code: int, message: str) -> None:
            if machine_ref:
                machine_ref[0].stop(code, message)

        output = console.write if console is not None else (lambda data: None)
        serial = Serial(KvmIrqLine(vm, layout.IRQ_COM1), output)
        pio.insert(COM1_BASE, 8, serial, "com1", inline=True)

        rtc = Rtc(KvmIrqLine(vm, layout.IRQ_RTC))
        pio.insert(RTC_BASE, 2, rtc, "rtc")
        rtc.set_timer_callback(_reactor_timer(loop, rtc.poll))

        i8042 = I8042(
            KvmIrqLine(vm, layout.IRQ_KEYBOARD), lambda: stop(exitcodes.EXIT_GUEST_RESET, "guest reset")
        )
        pio.insert(I8042_DATA, 1, i8042.data_port, "i8042-data")
        pio.insert(I8042_COMMAND, 1, i8042.command_port, "i8042-command")
        pio.insert(POST_PORT, 1, DebugPort(), "post", inline=True)

        ged_irq = IrqfdInterrupt(vm, layout.IRQ_ACPI_GED)
        closers.append(ged_irq.close)
        acpi_pm = AcpiPm(
            on_poweroff=lambda: stop(exitcodes.EXIT_GUEST_POWEROFF, "guest powered off"),
            on_reset=lambda: stop(exitcodes.EXIT_GUEST_RESET, "guest reset"),
            ged=ged_irq,
        )
        mmio.insert(layout.ACPI_PM_BASE, layout.ACPI_PM_SIZE, acpi_pm, "acpi-pm", inline=True)
        boot_timer = BootTimer(lambda: machine_ref[0].record_boot_marker() if machine_ref else None)
        mmio.insert(layout.BOOT_TIMER_BASE, 0x1000, boot_timer, "boot-timer", inline=True)

        virtio: tuple[VirtioMmioDevice, ...] = ()
        tables = build_acpi_tables(AcpiConfig(num_cpus=config.cpus, virtio_devices=virtio))
        memory.write(layout.ACPI_TABLES_ADDR, tables.blob)
        memory.write(layout.MPTABLE_ADDR, build_mptable(config.cpus))

        vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
        tsc_khz = vcpus[0].get_tsc_khz()
        cmdline = merge_cmdline(config.cmdline, default_cmdline(tsc_khz) if config.serial != "none" else [])
        plan = load_linux(memory, config.kernel, config.initrd, cmdline, tables.rsdp_addr)
        supported = kvm.supported_cpuid()
        for v in vcpus:
            setup_vcpu(v, supported, config.cpus)
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
            devices={
                "serial": serial,
                "rtc": rtc,
                "i8042": i8042,
                "acpi_pm": acpi_pm,
                "boot_timer": boot_timer,
            },
            closers=closers,
        )
        machine = Machine(parts, loop)
        machine_ref.append(machine)
        if console is not None:
            console.attach_input(serial)
        return machine
    except BaseException:
        for closer in reversed(closers):
            closer()
        if vm is not None:
            vm.close()  # first: it holds the memory's buffers
        if memory is not None:
            memory.close()
        kvm.close()
        raise
