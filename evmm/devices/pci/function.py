"""A type-0 PCI function: identity, config space, BARs mapped into the bus's address spaces while the guest
has them decoded, and an INTx pin.

A device (the host bridge, a virtio-pci transport) is a ``PciFunction`` that says what each BAR decodes
(``bar_region``) and what its capabilities do when written (``config_written``).  The function moves each
BAR's region in the bus's memory or I/O container whenever a write to the command register or a BAR changes
where it decodes (PCI 3.0 §6.2.2, §6.2.5.1), and the region tree takes the change to KVM and the buses.
Config accesses arrive on the reactor, as do the device's interrupts.
"""

from __future__ import annotations

from collections.abc import Sequence

from evmm.address_space.region import Container, Region
from evmm.devices.irq import IrqLine
from evmm.devices.pci.bar import Bar
from evmm.devices.pci.config import (
    BAR0,
    BAR_COUNT,
    CACHE_LINE_SIZE,
    CLASS_PROG,
    COMMAND,
    COMMAND_INTX_DISABLE,
    COMMAND_WRITABLE,
    DEVICE_ID,
    HEADER_TYPE,
    HEADER_TYPE_NORMAL,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    REVISION_ID,
    STATUS,
    STATUS_ERRORS,
    STATUS_INTERRUPT,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID,
    VENDOR_ID,
    ConfigSpace,
)
from evmm.errors import ConfigError, EvmmError
from evmm.log import log
from evmm.record import record


@record(frozen=True)
class PciIds:
    vendor: int
    device: int
    class_code: int  # base class, subclass, programming interface: 0x060000 is a host bridge
    revision: int = 0
    subsystem_vendor: int = 0
    subsystem: int = 0


def _touches(offset: int, size: int, start: int, length: int) -> bool:
    return offset < start + length and start < offset + size


class PciFunction:
    def __init__(self, name: str, ids: PciIds, bars: Sequence[Bar] = (), *, intx_pin: int = 0) -> None:
        """``intx_pin``: 1-4 for INTA#-INTD#, 0 for a function with no INTx (§6.2.4)."""
        self.name = name
        self.ids = ids
        self.config = ConfigSpace()
        self.bars = {bar.index: bar for bar in bars}
        used = [r for bar in bars for r in bar.registers]
        if len(used) != len(set(used)) or any(not BAR0 <= r < BAR0 + 4 * BAR_COUNT for r in used):
            raise ConfigError(f"PCI function {name}: its BARs overlap")
        self._regions: dict[int, Region] = {}
        self._mapped: dict[int, int] = {}  # BAR index -> address its region sits at in the bus's container
        self._containers: tuple[Container, Container] | None = None  # memory, I/O
        self._intx: IrqLine | None = None
        self._intx_level = False
        cfg = self.config
        cfg.set(VENDOR_ID, 2, ids.vendor)
        cfg.set(DEVICE_ID, 2, ids.device)
        cfg.set(COMMAND, 2, 0, writable=COMMAND_WRITABLE)
        cfg.set(STATUS, 2, 0, clear_on_write=STATUS_ERRORS)
        cfg.set(REVISION_ID, 1, ids.revision)
        cfg.set(CLASS_PROG, 3, ids.class_code)
        cfg.set(CACHE_LINE_SIZE, 1, 0, writable=0xFF)  # Linux writes it; it means nothing to a VMM
        cfg.set(HEADER_TYPE, 1, HEADER_TYPE_NORMAL)
        cfg.set(SUBSYSTEM_VENDOR_ID, 2, ids.subsystem_vendor)
        cfg.set(SUBSYSTEM_ID, 2, ids.subsystem)
        cfg.set(INTERRUPT_LINE, 1, 0, writable=0xFF if intx_pin else 0)  # the OS's note of its IRQ
        cfg.set(INTERRUPT_PIN, 1, intx_pin)
        for bar in bars:
            bar.install(cfg)

    # --- what a device says ---

    def bar_region(self, index: int) -> Region:
        """The region BAR ``index`` decodes (made once, then moved around by the guest)."""
        raise ConfigError(f"PCI function {self.name} has no region for BAR {index}")

    def config_written(self, offset: int, size: int) -> None:
        """The guest wrote config space at ``offset``: act on writable capability registers."""

    # --- the bus's side ---

    def attach(self, memory: Container, io: Container, intx: IrqLine | None = None) -> None:
        """Plugged into a bus: BARs map into ``memory`` and ``io`` as they are decoded."""
        self._containers = (memory, io)
        self._intx = intx
        self._update_bars()

    def detach(self) -> None:
        """Unplugged: every BAR unmapped, INTx released."""
        if self._containers is not None:
            for index in list(self._mapped):
                self._place(index, None)
        self._containers = None
        if self._intx is not None and self._intx_level:
            self._intx.set_level(False)
        self._intx = None

    def program_bar(self, index: int, address: int) -> None:
        """Firmware's job before boot: give BAR ``index`` an address (the guest decides to decode it)."""
        self.bars[index].install(self.config, address)
        self._update_bars()

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now, or None."""
        return self._mapped.get(index)

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        before = self.config.get(COMMAND, 2)
        self.config.write(offset, size, value)
        if _touches(offset, size, COMMAND, 2) or _touches(offset, size, BAR0, 4 * BAR_COUNT):
            self._update_bars()
        if (before ^ self.config.get(COMMAND, 2)) & COMMAND_INTX_DISABLE:
            self._drive_intx()
        self.config_written(offset, size)

    # --- INTx (§6.2.3 Interrupt Status, §6.2.2 Interrupt Disable) ---

    def set_intx(self, level: bool) -> None:
        """The device's INTx output; the pin follows unless the guest disabled INTx in the command register."""
        self._intx_level = level
        self.config.set_bits(STATUS, 2, STATUS_INTERRUPT, level)
        self._drive_intx()

    def _drive_intx(self) -> None:
        if self._intx is not None:
            disabled = self.config.get(COMMAND, 2) & COMMAND_INTX_DISABLE
            self._intx.set_level(self._intx_level and not disabled)

    # --- BAR placement ---

    def _update_bars(self) -> None:
        if self._containers is None:
            return
        command = self.config.get(COMMAND, 2)
        for index, bar in self.bars.items():
            address = bar.decoded(self.config, command)
            if address != self._mapped.get(index):
                try:
                    self._place(index, address)
                except EvmmError as e:
                    # The tree refused the change (KVM out of slots): the BAR stays unmapped, the VMM runs on.
                    log.warning("%s: BAR %d at %s: %s", self.name, index, address, e)

    def _place(self, index: int, address: int | None) -> None:
        assert self._containers is not None
        container = self._containers[1 if self.bars[index].is_io else 0]
        region = self._regions.get(index)
        if region is None:
            region = self._regions[index] = self.bar_region(index)
            if region.size != self.bars[index].size:
                raise ConfigError(
                    f"{self.name}: BAR {index} is {self.bars[index].size:#x} bytes, its region {region.size:#x}"
                )
        try:
            if address is None:
                if region.parent is container:
                    container.remove(region)
            elif region.parent is container:
                container.move(region, address)
            else:
                container.add(region, address)
        finally:
            # A listener's failure leaves the change made in the tree; say where the region really is.
            if region.parent is container:
                self._mapped[index] = region.offset
            else:
                self._mapped.pop(index, None)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "vendor": self.ids.vendor,
            "device": self.ids.device,
            "class": self.ids.class_code,
            "command": self.config.get(COMMAND, 2),
            "bars": [
                {"bar": i, "size": b.size, "kind": b.kind.value, "address": self._mapped.get(i)}
                for i, b in sorted(self.bars.items())
            ],
            "capabilities": [cap_id for _, cap_id in self.config.capabilities()],
        }
