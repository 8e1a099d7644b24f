"""What both boards are made of: the KVM VM, region-tree memory, the PC's legacy devices, the virtio backends
the user asked for, and the vCPUs and boot state; ``microvm.py`` and ``standard.py`` add their transports
and firmware tables.

Memory and I/O are two address spaces (evmm/address_space): guest RAM and every device's registers are
regions in them, and listeners make each change real (KVM memory slots and ioeventfds, the buses the vCPU
threads dispatch exits on).  The legacy devices sit above everything else (priority 1), so a BAR the guest
places over them (the standard board's I/O windows cover the ISA ports) is hidden under them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import field
from typing import TYPE_CHECKING

from evmm import exitcodes
from evmm.address_space import AddressSpace, Container, Io, Ram
from evmm.address_space.listener import BusListener, KvmListener
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
from evmm.errors import KvmError
from evmm.kvm import Kvm, Vcpu, Vm
from evmm.log import log
from evmm.loop.console import ConsoleIO
from evmm.machine.cmdline import merge_cmdline
from evmm.machine.config import MachineConfig, check_cpus
from evmm.machine.devices import Devices
from evmm.machine.interrupts import IrqfdInterrupt, KvmIrqLine
from evmm.machine.lifecycle import Lifecycle
from evmm.machine.machine import Machine, MachineParts
from evmm.machine.msi import GsiRouting
from evmm.memory import GuestMemory
from evmm.record import record
from evmm.startup import Laps

if TYPE_CHECKING:
    from evmm.devices.virtio.console import VirtioConsole

COM1_BASE = 0x3F8
RTC_BASE = 0x70
I8042_DATA = 0x60
I8042_COMMAND = 0x64
POST_PORT = 0x80
LEGACY_PRIORITY = 1  # above the standard board's PCI windows (the I/O windows hold the ISA ports)


def default_cmdline(tsc_khz: int, console: str, *, pci: bool = False) -> list[str]:
    """What the board adds unless the user's --append already says it.

    console=: where the console is (the UART, or hvc0 when the virtio console owns the terminal).  reboot=k:
    reset through the i8042 (0xFE on port 0x64): with hardware-reduced ACPI and no EFI, Linux 6.1 would first
    try EFI and then a real-mode BIOS jump that hangs, never reaching the ACPI reset register.  pci=off: a
    board without PCI, so the kernel does not probe config space.  i8042.noaux: no mouse port, skip probing
    it.  panic=-1: a panicking guest reboots at once, so evmm exits instead of hanging.  tsc_early_khz: tell
    the kernel the TSC rate KVM gives it; under nested emulation early calibration can otherwise hang.
    """
    words = [f"console={console}", "reboot=k", *([] if pci else ["pci=off"]), "i8042.noaux", "panic=-1"]
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
class Build:
    """What the build has created so far, so a failure can release it in order."""

    kvm: Kvm
    vm: Vm | None = None
    memory: GuestMemory | None = None
    laps: Laps = field(default_factory=Laps)  # the start-up's steps, for -v (evmm.startup)

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


def create_vm(b: Build, config: MachineConfig) -> Vm:
    """The VM with its in-kernel irqchip and PIT; the caller sets the GSI routing before the PIT is used."""
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
    return vm


@record
class Spaces:
    """Guest memory and port I/O as region trees, and the buses the vCPU threads dispatch exits on."""

    memory: AddressSpace
    io: AddressSpace
    mmio_bus: Bus
    pio_bus: Bus


def address_spaces(vm: Vm, ram: GuestMemory) -> Spaces:
    """Both spaces, made real by KVM (slots, ioeventfds) and by the buses; guest RAM placed in memory."""
    spaces = Spaces(
        AddressSpace("memory", Container("system", 1 << 64)),
        AddressSpace("io", Container("ports", 1 << 16)),
        Bus("mmio"),
        Bus("pio"),
    )
    spaces.memory.add_listener(KvmListener(vm))
    spaces.memory.add_listener(BusListener(spaces.mmio_bus))
    spaces.io.add_listener(KvmListener(vm, pio=True))
    spaces.io.add_listener(BusListener(spaces.pio_bus))
    with spaces.memory.transaction():
        for i, region in enumerate(ram.regions):
            spaces.memory.root.add(Ram(f"ram{i}", region.buffer), region.gpa)
    return spaces


@record(frozen=True)
class Legacy:
    """The board's ISA and ACPI devices, as the builder wires them further."""

    serial: Serial
    serial_fast: UartFastPath
    i8042: I8042
    acpi_pm: AcpiPm
    rtc: Rtc
    boot_timer: BootTimer


def legacy_devices(
    b: Build,
    vm: Vm,
    spaces: Spaces,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    lifecycle: Lifecycle,
) -> Legacy:
    # The UART's output ring lives with its C fast path (LSR reads and THR writes answered on the vCPU
    # thread); the console drains it.  Without a console nobody drains it: output is dropped once it fills.
    fast = UartFastPath(COM1_BASE, console.wake_fd if console is not None else -1)
    if console is not None:
        console.add_source(fast.take)
    serial = Serial(KvmIrqLine(vm, layout.IRQ_COM1), fast.put, fast=fast)
    rtc = Rtc(KvmIrqLine(vm, layout.IRQ_RTC))
    rtc.set_timer_callback(_reactor_timer(loop, rtc.poll))
    i8042 = I8042(
        KvmIrqLine(vm, layout.IRQ_KEYBOARD), lambda: lifecycle.stop(exitcodes.EXIT_GUEST_RESET, "guest reset")
    )
    ged_irq = IrqfdInterrupt(vm, layout.IRQ_ACPI_GED)
    b.closers.append(ged_irq.close)
    acpi_pm = AcpiPm(
        ged=ged_irq,
        on_poweroff=lambda: lifecycle.stop(exitcodes.EXIT_GUEST_POWEROFF, "guest powered off"),
        on_reset=lambda: lifecycle.stop(exitcodes.EXIT_GUEST_RESET, "guest reset"),
    )
    with spaces.io.transaction(), spaces.memory.transaction():
        ports, memory = spaces.io.root, spaces.memory.root
        ports.add(Io("com1", 8, serial), COM1_BASE, LEGACY_PRIORITY)
        ports.add(Io("rtc", 2, rtc), RTC_BASE, LEGACY_PRIORITY)
        ports.add(Io("i8042-data", 1, i8042.data_port), I8042_DATA, LEGACY_PRIORITY)
        ports.add(Io("i8042-command", 1, i8042.command_port), I8042_COMMAND, LEGACY_PRIORITY)
        ports.add(Io("post", 1, DebugPort()), POST_PORT, LEGACY_PRIORITY)
        memory.add(Io("acpi-pm", layout.ACPI_PM_SIZE, acpi_pm), layout.ACPI_PM_BASE, LEGACY_PRIORITY)
        boot_timer = BootTimer(lifecycle.boot_marker)
        memory.add(Io("boot-timer", 0x1000, boot_timer), layout.BOOT_TIMER_BASE, LEGACY_PRIORITY)
    return Legacy(serial, fast, i8042, acpi_pm, rtc, boot_timer)


def make_virtio_devices(
    config: MachineConfig, stdio: tuple[int, int] | None
) -> list[tuple[str, VirtioDevice]]:
    """Backends in slot order: disks, NICs, vsock, console, rng, shared directories (imported only when asked
    for)."""
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
    if config.fss:
        from evmm.devices.virtio.fs import make_fs

        for fs in config.fss:
            devices.append((f"fs-{fs.tag}", make_fs(fs, len(config.fss))))
    return devices


def console_name(config: MachineConfig) -> str:
    return "hvc0" if config.console is not None and config.console.kind == "stdio" else "ttyS0"


@record
class Base:
    """What every board starts from: the VM with its routing table, guest RAM, both address spaces and the
    legacy devices."""

    vm: Vm
    routing: GsiRouting
    memory: GuestMemory
    spaces: Spaces
    legacy: Legacy


def base(
    b: Build,
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    lifecycle: Lifecycle,
    memory: GuestMemory | None,
) -> Base:
    vm = create_vm(b, config)
    routing = GsiRouting(vm, pc_gsi_routes())  # before the PIT, which raises IRQ 0 through it
    vm.create_pit2()
    b.laps.lap("kvm")
    if memory is None:
        memory = GuestMemory.anonymous(layout.ram_layout(config.memory))
    b.memory = memory
    spaces = address_spaces(vm, memory)
    b.laps.lap("memory")
    return Base(vm, routing, memory, spaces, legacy_devices(b, vm, spaces, loop, console, lifecycle))


def build(
    config: MachineConfig,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    kvm_path: str,
    body: Callable[[Build, Base, Lifecycle], Machine],
    memory: GuestMemory | None = None,
    laps: Laps | None = None,
) -> Machine:
    """A board: its ``base``, then ``body`` adds the rest; whatever was made is released if anything fails.
    ``memory``: guest RAM that already holds a guest (a restored snapshot's) instead of fresh RAM; ``laps``:
    the start-up so far, which the build goes on timing step by step (``evmm run -v``)."""
    b = Build(Kvm(kvm_path), laps=laps if laps is not None else Laps())
    lifecycle = Lifecycle()
    try:
        return body(b, base(b, config, loop, console, lifecycle, memory), lifecycle)
    except BaseException:
        b.abort()
        raise


def virtio_console(virtio: list[tuple[str, VirtioDevice]]) -> VirtioConsole | None:
    """The --virtio-console device among the board's, for the machine (its size follows the terminal)."""
    from evmm.devices.virtio.console import VirtioConsole

    return next((d for _, d in virtio if isinstance(d, VirtioConsole)), None)


def assemble(
    b: Build,
    board: Base,
    config: MachineConfig,
    lifecycle: Lifecycle,
    loop: asyncio.AbstractEventLoop,
    console: ConsoleIO | None,
    boot: tuple[list[Vcpu], str],
    devices: Devices,
) -> Machine:
    """The running machine from what the board built; ``boot`` is ``boot_vcpus``'s answer."""
    vcpus, cmdline = boot
    parts = MachineParts(
        config=config,
        kvm=b.kvm,
        vm=board.vm,
        memory=board.memory,
        vcpus=vcpus,
        pio=board.spaces.pio_bus,
        mmio=board.spaces.mmio_bus,
        cmdline=cmdline,
        devices=devices,
        lifecycle=lifecycle,
        closers=b.closers,
        laps=b.laps,
    )
    machine = Machine(parts, loop)
    if console is not None:
        console.attach_input(board.legacy.serial)
    return machine


def boot_vcpus(
    b: Build,
    vm: Vm,
    config: MachineConfig,
    memory: GuestMemory,
    legacy: Legacy,
    rsdp_addr: int,
    defaults: Callable[[int], list[str]],
    *,
    boot: bool = True,
) -> tuple[list[Vcpu], str]:
    """The vCPUs, the MP table, the kernel loaded with its command line; ``defaults(tsc_khz)`` are the
    board's command-line words.  Returns the vCPUs and the command line.  Without ``boot`` (a restore: RAM
    holds the booted guest, and the vCPUs get their saved state next) only the vCPUs are made."""
    vcpus = [vm.create_vcpu(i) for i in range(config.cpus)]
    if not boot:
        for v in vcpus:
            v.set_exit_hooks([legacy.serial_fast])
        return vcpus, config.cmdline
    memory.write(layout.MPTABLE_ADDR, build_mptable(config.cpus))
    cmdline = merge_cmdline(config.cmdline, defaults(vcpus[0].get_tsc_khz()))
    b.laps.lap("vcpus")
    plan = load_linux(memory, config.kernel, config.initrd, cmdline, rsdp_addr)
    b.laps.lap("kernel")
    supported = b.kvm.supported_cpuid()
    for v in vcpus:
        setup_vcpu(v, supported, config.cpus)
        v.set_exit_hooks([legacy.serial_fast])
    setup_boot_vcpu(vcpus[0], plan)
    b.laps.lap("cpu state")
    return vcpus, cmdline
