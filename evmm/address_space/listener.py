"""Listeners that make a flat view real: KVM memory slots and ioeventfds, and the buses the vCPU threads
dispatch exits on.

``KvmListener`` gives each visible piece of RAM or ROM a memory slot (KVM_SET_USER_MEMORY_REGION) and each
visible ioeventfd a KVM_IOEVENTFD, as StratoVirt's KvmMemoryListener and KvmIoListener do; a RAM piece that
does not start and end on a host page is trimmed inward, because a slot must (Documentation/virt/kvm/api.rst,
KVM_SET_USER_MEMORY_REGION), and the trimmed bytes then reach no device.  ``BusListener`` keeps a ``Bus``
equal to the view's I/O ranges, so the exit dispatcher keeps its lock-free lookup.
"""

from __future__ import annotations

import mmap
from typing import Protocol

from evmm.address_space.flatview import FlatRange, IoEventFd
from evmm.address_space.region import Io, Ram
from evmm.devices.bus import ON_REACTOR, Bus, BusDevice, OnVcpu
from evmm.errors import ConfigError
from evmm.log import log


class SlotVm(Protocol):
    """What the KVM listener needs of a VM (``evmm.kvm.Vm``; tests pass a recording fake)."""

    def set_user_memory_region(
        self,
        slot: int,
        gpa: int,
        buffer: mmap.mmap,
        *,
        readonly: bool = False,
        offset: int = 0,
        size: int | None = None,
    ) -> None: ...

    def delete_user_memory_region(self, slot: int) -> None: ...

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None: ...


def page_trim(start: int, end: int, page: int = mmap.PAGESIZE) -> tuple[int, int]:
    """``[start, end)`` shrunk to whole pages (possibly empty: ``start >= end``)."""
    return -(-start // page) * page, end // page * page


class KvmListener:
    """Memory slots for RAM and ROM, ioeventfds for I/O regions; ``pio`` for the port I/O space."""

    def __init__(self, vm: SlotVm, *, pio: bool = False, max_slots: int = 509) -> None:
        self._vm = vm
        self._pio = pio
        self._max_slots = max_slots  # KVM_CAP_NR_MEMSLOTS on x86 hosts without the user's limits raised
        self._slots: dict[FlatRange, int] = {}

    def region_add(self, fr: FlatRange) -> None:
        region = fr.region
        if not isinstance(region, Ram):
            return
        if self._pio:
            raise ConfigError(f"{region.name}: RAM cannot be mapped in the port I/O space")
        start, end = page_trim(fr.start, fr.end)
        if start >= end:
            log.debug("%s at %#x+%#x is less than a page: left unmapped", region.name, fr.start, fr.size)
            return
        used = set(self._slots.values())
        slot = next((s for s in range(self._max_slots) if s not in used), None)
        if slot is None:
            raise ConfigError(f"{region.name}: all {self._max_slots} KVM memory slots are in use")
        offset = region.buffer_offset + fr.offset_in_region + (start - fr.start)
        self._vm.set_user_memory_region(
            slot, start, region.buffer, readonly=region.readonly, offset=offset, size=end - start
        )
        self._slots[fr] = slot

    def region_del(self, fr: FlatRange) -> None:
        slot = self._slots.pop(fr, None)
        if slot is not None:
            self._vm.delete_user_memory_region(slot)

    def ioeventfd_add(self, e: IoEventFd) -> None:
        self._vm.ioeventfd(e.fd, e.addr, e.length, datamatch=e.datamatch, pio=self._pio)

    def ioeventfd_del(self, e: IoEventFd) -> None:
        self._vm.ioeventfd(e.fd, e.addr, e.length, datamatch=e.datamatch, pio=self._pio, deassign=True)

    @property
    def slots(self) -> dict[int, FlatRange]:
        return {slot: fr for fr, slot in self._slots.items()}


class _Shifted:
    """A device seen from the middle of its region (the first part hidden by a region above it): offsets
    on the bus start where the visible part starts, the device's where the region starts.  Its ``on_vcpu``
    declaration moves with the offsets."""

    def __init__(self, device: BusDevice, shift: int) -> None:
        self._device = device
        self._shift = shift
        where = getattr(device, "on_vcpu", ON_REACTOR)
        self.on_vcpu = OnVcpu(
            everything=where.everything,
            reads=frozenset(o - shift for o in where.reads if o >= shift),
            writes=frozenset(o - shift for o in where.writes if o >= shift),
        )

    def read(self, offset: int, size: int) -> int:
        return self._device.read(offset + self._shift, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._device.write(offset + self._shift, size, value)


class BusListener:
    """Keeps ``bus`` mapping exactly the view's I/O ranges, each to its region's device."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def region_add(self, fr: FlatRange) -> None:
        region = fr.region
        if not isinstance(region, Io):
            return
        device = region.device if fr.offset_in_region == 0 else _Shifted(region.device, fr.offset_in_region)
        self.bus.insert(fr.start, fr.size, device, region.name)

    def region_del(self, fr: FlatRange) -> None:
        if isinstance(fr.region, Io):
            self.bus.remove(fr.start)

    def ioeventfd_add(self, e: IoEventFd) -> None:
        pass

    def ioeventfd_del(self, e: IoEventFd) -> None:
        pass
