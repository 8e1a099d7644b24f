"""The ``microvm`` board: vCPUs, flat RAM, legacy ISA devices, virtio-mmio, described by ACPI (no PCI).

The only place that wires parts together: KVM objects, guest memory, buses, devices and their interrupt lines,
firmware tables and the boot state.  Devices get what they need (an interrupt line, a callback); none of them
reaches back into the machine: those that stop it get the ``Lifecycle`` made before them, which the machine
attaches to once built.  What the machine itself acts on it gets as typed handles (``Devices``).
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
from evmm.devices.legacy.serial_fast import UartFastPath
from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.mmio import VirtioMmio
from evmm.errors import ConfigError, KvmError
from evmm.kvm import Kvm, Vm
from evmm.log import log
from evmm.loop.console import ConsoleIO
from evmm.machine.cmdline import merge_cmdline
from evmm.machine.config import MachineConfig, check_cpus
from evmm.machine.devices import Devices
from evmm.machine.hotplug import HotplugSlot, make_empty_blk, make_empty_net
from evmm.machine.interrupts import IrqfdInterrupt, KvmIrqLine, KvmNotifyRegistrar
from evmm.machine.lifecycle import Lifecycle
from evmm.machine.machine import Machine, MachineParts
from evmm.memory import GuestMemory
from evmm.record import record
from evmm.startup import Laps

COM1_BASE = 0x3F8
RTC_BASE = 0x70
I8042_DATA = 0x60
I8042_COMMAND = 0x64
POST_PORT = 0x80


def default_cmdline(tsc_khz: int, console: str) -> list[str]:
    """What the board adds unless the user's --append already says it.

    console=: where the console is (the UART, or hvc0 when the virtio console owns the terminal).  reboot=k:
    reset through the i8042 (0xFE on port 0x64): with hardware-reduced ACPI and no EFI, Linux 6.1 would first
    try EFI and then a real-mode BIOS jump that hangs, never reaching the ACPI reset register.  pci=off: the
    board has no PCI, don't probe config space.  i8042.noaux: no mouse port, skip probing it.  panic=-1: a
    panicking guest reboots at once, so evmm exits instead of hanging.  tsc_early_khz: tell the kernel the TSC
    rate KVM gives it; under nested emulation early calibration can otherwise hang.
    """
    words = [f"console={console}", "reboot=k", "pci=off", "i8042.noaux", "panic=-1"]
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


@record
class _Build:
    """What the build has created so far, so a failure can release it in order."""

    kvm: Kvm
    vm: Vm | None = None
    memory: GuestMemory | None = None

    def __post_init__(self) -> None:
        self.closers: list[Callable[[], None]] = []

    def abort(self) -> None:
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as e:  # keep releasing the rest
                log.debug("cleanup after a failed build: %s", e)
        if self.vm is not None:
            self.vm.close()  # before the memory: the VM holds its buffers
        if self.memory is not None:
            self.memory.close()
        self.kvm.close()


@record(frozen=True)
class _Legacy:
    """The board's ISA and ACPI devices, as the builder wires them further."""

    serial: Serial
    serial_fast: UartFastPath
    i8042: I8042
    acpi_pm: AcpiPm


def _legacy_devices(
    b: _Build,
    vm: Vm,
    pio: Bus,
    mmio: Bus,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    lifecycle: Lifecycle,
) -> _Legacy:
    # The UART's output ring lives with its C fast path (LSR reads and THR writes answered on the vCPU
    # thread); the console drains it.  Without a console nobody drains it: output is dropped once it fills.
    fast = UartFastPath(COM1_BASE, console.wake_fd if console is not None else -1)
    if console is not None:
        console.add_source(fast.take)
    serial = Serial(KvmIrqLine(vm, layout.IRQ_COM1), fast.put, fast=fast)
    pio.insert(COM1_BASE, 8, serial, "com1")

    rtc = Rtc(KvmIrqLine(vm, layout.IRQ_RTC))
    pio.insert(RTC_BASE, 2, rtc, "rtc")
    rtc.set_timer_callback(_reactor_timer(loop, rtc.poll))

    i8042 = I8042(
        KvmIrqLine(vm, layout.IRQ_KEYBOARD), lambda: lifecycle.stop(exitcodes.EXIT_GUEST_RESET, "guest reset")
    )
    pio.insert(I8042_DATA, 1, i8042.data_port, "i8042-data")
    pio.insert(I8042_COMMAND, 1, i8042.command_port, "i8042-command")
    pio.insert(POST_PORT, 1, DebugPort(), "post")

    ged_irq = IrqfdInterrupt(vm, layout.IRQ_ACPI_GED)
    b.closers.append(ged_irq.close)
    acpi_pm = AcpiPm(
        ged=ged_irq,
        on_poweroff=lambda: lifecycle.stop(exitcodes.EXIT_GUEST_POWEROFF, "guest powered off"),
        on_reset=lambda: lifecycle.stop(exitcodes.EXIT_GUEST_RESET, "guest reset"),
    )
    mmio.insert(layout.ACPI_PM_BASE, layout.ACPI_PM_SIZE, acpi_pm, "acpi-pm")
    mmio.insert(layout.BOOT_TIMER_BASE, 0x1000, BootTimer(lifecycle.boot_marker), "boot-timer")
    return _Legacy(serial, fast, i8042, acpi_pm)


def _make_virtio_devices(
    config: MachineConfig, stdio: tuple[int, int] | None
) -> list[tuple[str, VirtioDevice]]:
    """Backends in slot order: disks, NICs, vsock, console, rng (imported only when asked for)."""
    devices: list[tuple[str, VirtioDevice]] = []
    if config.drives:
        from evmm.devices.virtio.blk import make_blk

        for i, drive in enumerate(config.drives):
            devices.append((drive.id or f"blk{i}", make_blk(drive)))
    if config.nets:
        from evmm.devices.virtio.net import make_net

        for i, net in enumerate(config.nets):
            devices.append((net.id or f"net{i}", make_net(net, i, cpus=config.cpus)))
    if config.vsock is not None:
        from evmm.devices.virtio.vsock import make_vsock

        devices.append(("vsock", make_vsock(config.vsock)))
    if config.console is not None:
        from evmm.devices.virtio.console import make_console

        devices.append(("console", make_console(config.console, stdio)))
    if config.rng is not None:
        from evmm.devices.virtio.rng import VirtioRng

        devices.append(("rng", VirtioRng(config.rng.rate)))
    return devices


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
    b: _Build,
    vm: Vm,
    memory: GuestMemory,
    mmio: Bus,
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
        mmio.insert(base, layout.VIRTIO_MMIO_SIZE, t, f"virtio-{name}")
        transports.append(t)
    return transports


def _virtio_cmdline_words(transports: list[VirtioMmio]) -> list[str]:
    """virtio_mmio.device=<size>@<base>:<irq> (Documentation/admin-guide/kernel-parameters.txt)."""
    return [
        f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE // 1024}K@{t.base:#x}:{layout.VIRTIO_IRQS[i]}"
        for i, t in enumerate(transports)
    ]


def build_microvm(
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    *,
    stdio: tuple[int, int] | None = None,
    kvm_path: str = "/dev/kvm",
    laps: Laps | None = None,
) -> Machine:
    laps = laps if laps is not None else Laps()
    b = _Build(Kvm(kvm_path))
    lifecycle = Lifecycle()
    try:
        kvm = b.kvm
        kvm.require()
        check_cpus(config.cpus, kvm.max_vcpus())
        vm = b.vm = kvm.create_vm()
        # Intel needs these three pages below 4 GiB for real-mode emulation; on AMD they are harmless.
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        try:
            vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        except KvmError:
            pass  # only Intel hosts implement it
        vm.create_irqchip()
        vm.set_gsi_routing(pc_gsi_routes())
        vm.create_pit2()
        laps.lap("kvm")

        memory = b.memory = GuestMemory.anonymous(layout.ram_layout(config.memory))
        for slot, region in enumerate(memory.regions):
            vm.set_user_memory_region(slot, region.gpa, region.buffer)
        laps.lap("memory")

        pio, mmio = Bus("pio"), Bus("mmio")
        legacy = _legacy_devices(b, vm, pio, mmio, loop, console, lifecycle)
        slots = _make_hotplug_slots(config)
        virtio = _make_virtio_devices(config, stdio) + [(slot.id, slot.device) for slot in slots]
        transports = _virtio_transports(b, vm, memory, mmio, loop, virtio)
        laps.lap("devices")

        acpi_devices = tuple(
            VirtioMmioDevice(t.base, layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQS[i])
            for i, t in enumerate(transports)
        )
        tables = build_acpi_tables(AcpiConfig(num_cpus=config.cpus, virtio_devices=acpi_devices))
        memory.write(layout.ACPI_TABLES_ADDR, tables.blob)
        memory.write(layout.MPTABLE_ADDR, build_mptable(config.cpus))
        laps.lap("acpi")

        vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
        console_name = "hvc0" if config.console is not None and config.console.kind == "stdio" else "ttyS0"
        defaults = default_cmdline(vcpus[0].get_tsc_khz(), console_name)
        acpi_off = "acpi=off" in config.cmdline.split()
        if config.virtio_cmdline or (config.virtio_cmdline is None and acpi_off):
            defaults += _virtio_cmdline_words(transports)
        cmdline = merge_cmdline(config.cmdline, defaults)
        laps.lap("vcpus")
        plan = load_linux(memory, config.kernel, config.initrd, cmdline, tables.rsdp_addr)
        laps.lap("kernel")
        supported = kvm.supported_cpuid()
        for v in vcpus:
            setup_vcpu(v, supported, config.cpus)
            v.set_exit_hooks([legacy.serial_fast])
        setup_boot_vcpu(vcpus[0], plan)
        laps.lap("cpu state")

        hvc = None
        if config.console is not None:
            from evmm.devices.virtio.console import VirtioConsole

            hvc = next(d for _, d in virtio if isinstance(d, VirtioConsole))
        devices = Devices(acpi_pm=legacy.acpi_pm, i8042=legacy.i8042, virtio_console=hvc, slots=slots)
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
            lifecycle=lifecycle,
            closers=b.closers,
            laps=laps,
        )
        machine = Machine(parts, loop)
        if console is not None:
            console.attach_input(legacy.serial)
        return machine
    except BaseException:
        b.abort()
        raise
