"""The DSDT of the microvm board: the devices the guest cannot discover by itself, as AML.

With no PCI bus, ACPI is how a Linux guest finds the legacy ISA devices (through ACPI PNP: 8250_pnp, rtc_cmos,
i8042), the virtio-mmio devices (virtio_mmio matches _HID "LNRO0005") and, in hardware-reduced ACPI, the power
button: a Generic Event Device (ACPI 6.5 §5.6.9) whose _EVT method notifies a control-method power button
(§4.8.2.2.1.2), which is how QEMU ``-M microvm`` delivers ``system_powerdown``.
"""

from __future__ import annotations

from collections.abc import Sequence

from evmm.acpi.aml import (
    IO,
    AccessType,
    AmlObject,
    And,
    Device,
    ExtendedInterrupt,
    Field,
    FieldUnit,
    If,
    IRQNoFlags,
    LEqual,
    Local,
    LockRule,
    Memory32Fixed,
    Method,
    Name,
    NameRef,
    Notify,
    OperationRegion,
    Package,
    RegionSpace,
    ResourceDescriptor,
    ResourceTemplate,
    Return,
    Scope,
    Store,
    String,
    Trigger,
    UpdateRule,
    eisa_id,
    term_list,
)
from evmm.arch.x86.layout import (
    ACPI_GED_EVENT_PCI_HOTPLUG,
    ACPI_GED_EVENT_POWER_BUTTON,
    ACPI_GED_EVENT_VMGENID,
    ACPI_PM_BASE,
    ACPI_PM_GED_EVENT,
    ACPI_S5_SLP_TYP,
    IRQ_ACPI_GED,
    IRQ_COM1,
    IRQ_COM2,
    IRQ_KEYBOARD,
    IRQ_RTC,
)
from evmm.record import record

SIGNATURE = b"DSDT"
REVISION = 2  # 2 or more: AML integers are 64-bit (ACPI 6.5 §5.2.11.1)
HEADER_SIZE = 36

COM1_PORT = 0x3F8
COM2_PORT = 0x2F8
UART_PORTS = 8
RTC_PORT = 0x70
RTC_PORTS = 2
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

# The value OSPM passes to Notify on a power button: "button pressed" (ACPI 6.5 §5.6.6, device object notification values).
NOTIFY_BUTTON_PRESSED = 0x80
POWER_BUTTON_PATH = "\\_SB.PWRB"
VMGENID_PATH = "\\_SB.VGEN"


@record(frozen=True)
class VirtioMmioDevice:
    """One virtio-mmio register window and the GSI (IOAPIC pin) it raises."""

    base: int
    size: int
    gsi: int


def _resources(*descriptors: ResourceDescriptor) -> Name:
    return Name("_CRS", ResourceTemplate(descriptors))


def _io(port: int, length: int) -> IO:
    return IO(minimum=port, maximum=port, alignment=1, length=length)


def _uart(name: str, uid: int, port: int, irq: int) -> Device:
    resources = _resources(_io(port, UART_PORTS), IRQNoFlags((irq,)))
    return Device(name, (Name("_HID", eisa_id("PNP0501")), Name("_UID", uid), resources))


def _rtc() -> Device:
    # rtc_cmos binds PNP0B00 through ACPI PNP; without this node it probes port 0x70 blindly or not at all.
    resources = _resources(_io(RTC_PORT, RTC_PORTS), IRQNoFlags((IRQ_RTC,)))
    return Device("RTC", (Name("_HID", eisa_id("PNP0B00")), resources))


def _i8042() -> Device:
    # i8042's PNP probe takes the data port from the first IO resource and the command port from the second.
    resources = _resources(_io(I8042_DATA_PORT, 1), _io(I8042_COMMAND_PORT, 1), IRQNoFlags((IRQ_KEYBOARD,)))
    return Device("KBD", (Name("_HID", eisa_id("PNP0303")), resources))


def _virtio(index: int, dev: VirtioMmioDevice) -> Device:
    # No _CCA: on x86 DMA is always cache-coherent, and _CCA is specified for ARM (ACPI 6.5 §6.2.17).
    resources = _resources(
        Memory32Fixed(dev.base, dev.size, writable=True),
        ExtendedInterrupt((dev.gsi,), trigger=Trigger.EDGE),
    )
    return Device(f"VR{index:02X}", (Name("_HID", String("LNRO0005")), Name("_UID", index), resources))


def _event(bit: int, *handler: AmlObject) -> If:
    return If(LEqual(And(Local(0), bit), bit), handler)


def _ged(pci_hotplug: str | None, vmgenid: bool) -> Device:
    """The Generic Event Device (ACPI 6.5 §5.6.9): its interrupt makes OSPM run _EVT(gsi).

    _EVT reads the event selector (reading clears it in the device model) and turns the power button bit
    into Notify(PWRB, 0x80), which Linux's button driver reports as KEY_POWER, the PCI hotplug bit into
    a call of the method ``pci_hotplug`` names (the standard board's slot notifications), and the VM
    generation bit into Notify(VGEN, 0x80), on which Linux's vmgenid driver reads the new ID.
    """
    selector = NameRef("ESEL")
    events: list[AmlObject] = [
        _event(ACPI_GED_EVENT_POWER_BUTTON, Notify(NameRef(POWER_BUTTON_PATH), NOTIFY_BUTTON_PRESSED))
    ]
    if pci_hotplug is not None:
        events.append(_event(ACPI_GED_EVENT_PCI_HOTPLUG, NameRef(pci_hotplug)))
    if vmgenid:
        events.append(_event(ACPI_GED_EVENT_VMGENID, Notify(NameRef(VMGENID_PATH), NOTIFY_BUTTON_PRESSED)))
    evt = Method("_EVT", arg_count=1, serialized=True, body=(Store(selector, Local(0)), *events))
    return Device(
        "GED",
        (
            Name("_HID", String("ACPI0013")),
            _resources(ExtendedInterrupt((IRQ_ACPI_GED,), trigger=Trigger.EDGE)),
            OperationRegion("EREG", RegionSpace.SYSTEM_MEMORY, ACPI_PM_BASE + ACPI_PM_GED_EVENT, 1),
            Field(
                "EREG",
                (FieldUnit("ESEL", 8),),
                access=AccessType.BYTE,
                lock=LockRule.NO_LOCK,
                update=UpdateRule.PRESERVE,
            ),
            evt,
        ),
    )


def _power_button() -> Device:
    return Device("PWRB", (Name("_HID", String("PNP0C0C")), Name("_UID", 0)))


def _vmgenid(addr: int) -> Device:
    """The VM Generation ID device (Microsoft's "Virtual Machine Generation ID" spec; ACPI 6.5 §5.6.9 for
    its notification through the GED): ADDR returns the guest-physical address of the 16-byte ID as a
    package of two 32-bit halves.  _CID is the spec's "VM_Gen_Counter"; Linux's vmgenid driver
    (drivers/virt/vmgenid.c) matches the _HID "VMGENCTR", and on a notify mixes the new ID into its RNG."""
    addr_method = Method("ADDR", 0, (Return(Package((addr & 0xFFFFFFFF, addr >> 32))),))
    name = String("VM_Gen_Counter")
    return Device(
        "VGEN", (Name("_HID", String("VMGENCTR")), Name("_CID", name), Name("_DDN", name), addr_method)
    )


def build_dsdt(
    *,
    virtio_devices: Sequence[VirtioMmioDevice],
    com1: bool,
    com2: bool,
    rtc: bool,
    i8042: bool,
    ged: bool,
    extra: Sequence[AmlObject] = (),
    pci_hotplug: str | None = None,
    vmgenid_addr: int | None = None,
) -> bytes:
    """The DSDT with a blank 36-byte header, which ``tables`` fills in and checksums.

    ``extra``: more devices for \\_SB (the standard board's PCI0); ``pci_hotplug``: the method the GED calls
    on a PCI hotplug event; ``vmgenid_addr``: where the VM generation ID is (its notification needs the GED).
    """
    devices: list[AmlObject] = []
    if com1:
        devices.append(_uart("COM1", 1, COM1_PORT, IRQ_COM1))
    if com2:
        devices.append(_uart("COM2", 2, COM2_PORT, IRQ_COM2))
    if rtc:
        devices.append(_rtc())
    if i8042:
        devices.append(_i8042())
    devices.extend(_virtio(i, dev) for i, dev in enumerate(virtio_devices))
    devices.extend(extra)
    if ged:
        devices += [_ged(pci_hotplug, vmgenid_addr is not None), _power_button()]
        if vmgenid_addr is not None:
            devices.append(_vmgenid(vmgenid_addr))
    terms: list[AmlObject] = [
        # \_S5 tells OSPM that S5 (soft off) exists and which SLP_TYP to write for it (ACPI 6.5 §7.4.2);
        # the second element is SLP_TYPb, which a hardware-reduced platform ignores.
        Name("_S5", Package((ACPI_S5_SLP_TYP, 0))),
        Scope("\\_SB", tuple(devices)),
    ]
    return bytes(HEADER_SIZE) + term_list(terms)
