"""PCI bus 0 of the standard board and the two ways the guest reaches its config space.

``PciRoot`` holds up to 32 single-function devices (device numbers 0-31, function 0; no bridges, so bus 0
is the only bus).  ``Ecam`` is the memory-mapped configuration window (PCI Express Base Specification §7.2.2,
Enhanced Configuration Access Mechanism; what the MCFG table points at): address bits 27:20 the bus, 19:15
the device, 14:12 the function, 11:0 the register.  ``ConfigIo`` is the PC's configuration mechanism #1 at
ports 0xCF8-0xCFF (PCI 3.0 §3.2.2.3.2): a dword write to CONFIG_ADDRESS selects enable bit 31, bus 23:16,
device 15:11, function 10:8 and register 7:2, and CONFIG_DATA then reaches that dword.  Linux probes it
first and uses it until MMCONFIG is known to work.

A config access to no device reads all ones and writes go nowhere (a master abort, §6.1), which is how the
guest learns that a slot is empty.  Accesses arrive on the reactor.
"""

from __future__ import annotations

from evmm.address_space.region import Container
from evmm.devices.irq import IrqLine
from evmm.devices.pci.function import PciFunction
from evmm.errors import ConfigError

DEVICES_PER_BUS = 32
ECAM_BUS_SIZE = 1 << 20
ECAM_FUNCTION_SIZE = 1 << 12
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_IO_PORTS = 8  # CONFIG_ADDRESS 0xCF8-0xCFB, CONFIG_DATA 0xCFC-0xCFF
CONFIG_ENABLE = 1 << 31


def all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciRoot:
    """Bus 0: devices by number; their BARs decode into ``memory`` and ``io``."""

    def __init__(self, memory: Container, io: Container) -> None:
        self.memory = memory
        self.io = io
        self._devices: list[PciFunction | None] = [None] * DEVICES_PER_BUS

    def plug(self, slot: int, function: PciFunction, intx: IrqLine | None = None) -> None:
        if not 0 <= slot < DEVICES_PER_BUS:
            raise ConfigError(f"PCI device number {slot} is out of range 0-{DEVICES_PER_BUS - 1}")
        present = self._devices[slot]
        if present is not None:
            raise ConfigError(f"PCI slot {slot} already holds {present.name}")
        self._devices[slot] = function
        function.attach(self.memory, self.io, intx)

    def unplug(self, slot: int) -> PciFunction:
        function = self.device(slot)
        if function is None:
            raise ConfigError(f"PCI slot {slot} is empty")
        self._devices[slot] = None
        function.detach()
        return function

    def device(self, slot: int) -> PciFunction | None:
        return self._devices[slot] if 0 <= slot < DEVICES_PER_BUS else None

    def slots(self) -> list[tuple[int, PciFunction]]:
        return [(slot, fn) for slot, fn in enumerate(self._devices) if fn is not None]

    def free_slot(self, first: int = 0) -> int | None:
        return next((s for s in range(first, DEVICES_PER_BUS) if self._devices[s] is None), None)

    def _target(self, bus: int, device: int, function: int) -> PciFunction | None:
        return self.device(device) if bus == 0 and function == 0 else None

    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        target = self._target(bus, device, function)
        return all_ones(size) if target is None else target.config_read(offset, size)

    def config_write(self, bus: int, device: int, function: int, offset: int, size: int, value: int) -> None:
        target = self._target(bus, device, function)
        if target is not None:
            target.config_write(offset, size, value)


class Ecam:
    """The MMCONFIG window of ``buses`` buses, a ``BusDevice``."""

    def __init__(self, root: PciRoot, buses: int = 256) -> None:
        self.root = root
        self.size = buses * ECAM_BUS_SIZE

    @staticmethod
    def decode(offset: int) -> tuple[int, int, int, int]:
        """(bus, device, function, register) of a window offset."""
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        bus, device, function, reg = self.decode(offset)
        if reg + size > ECAM_FUNCTION_SIZE:
            return all_ones(size)  # straddles two functions: no completer
        return self.root.config_read(bus, device, function, reg, size)

    def write(self, offset: int, size: int, value: int) -> None:
        bus, device, function, reg = self.decode(offset)
        if reg + size <= ECAM_FUNCTION_SIZE:
            self.root.config_write(bus, device, function, reg, size, value)


class ConfigIo:
    """Configuration mechanism #1 at 0xCF8, a port-I/O ``BusDevice`` of 8 ports."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root
        self.address = 0  # one latch shared by every vCPU: Linux serialises its pairs (pci_config_lock)

    def _selected(self, port_offset: int) -> tuple[int, int, int, int] | None:
        address = self.address
        if not address & CONFIG_ENABLE:
            return None
        reg = (address & 0xFC) + port_offset - 4
        return (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7, reg

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            # Only a dword access at 0xCF8 is CONFIG_ADDRESS; byte and word accesses there are other
            # chipset registers (0xCF9 is the reset control of Intel's), which this board does not have.
            if offset == 0 and size == 4:
                return self.address
            return all_ones(size)
        target = self._selected(offset)
        if target is None or offset + size > CONFIG_IO_PORTS:
            return all_ones(size)
        return self.root.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FF_FFFC  # bits 30:24 reserved, 1:0 read as zero
            return
        target = self._selected(offset)
        if target is not None and offset + size <= CONFIG_IO_PORTS:
            self.root.config_write(*target, size, value)
