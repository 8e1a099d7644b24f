"""The nodes of an address-space tree: RAM, ROM, I/O (MMIO or port) regions, containers and aliases.

The model is StratoVirt's ``address_space`` crate and QEMU's memory API: a board describes what decodes where
as a tree, each node at an offset in its parent container, with a priority that decides which of two
overlapping siblings the guest sees; an alias shows a window of another region somewhere else (the PCI
memory space seen through its 32-bit and 64-bit holes).  Nothing here knows KVM: ``AddressSpace`` flattens
the tree into a ``FlatView`` and listeners turn the differences into memory slots, bus mappings and
ioeventfds.

Every change to a node that is part of an address space (a BAR moved by the guest, a device hot-added)
updates that space at once, or when its transaction ends.  Changes come from the thread that builds the
board and, later, from the reactor (config-space writes, hotplug); never from two threads at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from evmm.devices.bus import BusDevice
from evmm.errors import ConfigError
from evmm.record import record

if TYPE_CHECKING:
    from mmap import mmap

    from evmm.address_space.space import AddressSpace

_seq = itertools.count()


@record(frozen=True)
class IoEventFdSpec:
    """An eventfd KVM signals on a guest write of ``length`` bytes at ``offset`` in an I/O region, instead of
    exiting to userspace; with ``datamatch`` only when the value written is that one (KVM_IOEVENTFD)."""

    offset: int
    length: int
    fd: int
    datamatch: int | None = None


def _closure(start: Region, step: Callable[[Region], list[Region]]) -> set[Region]:
    seen: set[Region] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += step(node)
    return seen


class Region:
    """A node: a name, a size, and where it sits once added to a container (or aliased)."""

    def __init__(self, name: str, size: int) -> None:
        if size <= 0:
            raise ConfigError(f"region {name}: size {size:#x} must be positive")
        self.name = name
        self.size = size
        self.parent: Container | None = None
        self.offset = 0
        self.priority = 0
        self.seq = 0  # insertion order: among equal priorities the later region is on top
        self._aliases: list[Alias] = []
        self._space: AddressSpace | None = None  # set on a root only

    def _changed(self) -> None:
        """Something the guest could see changed: update the address spaces this node is part of."""
        for node in self.users():
            if node._space is not None:
                node._space.update()

    def users(self) -> set[Region]:
        """This node and every node that shows it: its containers and aliases, up to the roots."""
        return _closure(self, lambda n: [*n._aliases, *([] if n.parent is None else [n.parent])])

    def shown(self) -> set[Region]:
        """This node and every node it shows: its children and alias targets, down to the leaves."""
        return _closure(self, lambda n: n._children if isinstance(n, Container) else n.targets())

    def targets(self) -> list[Region]:
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.size:#x}>"


class Ram(Region):
    """Guest RAM backed by a host mapping the VMM keeps; KVM maps it as a memory slot."""

    readonly = False

    def __init__(self, name: str, buffer: mmap, buffer_offset: int = 0, size: int | None = None) -> None:
        super().__init__(name, len(buffer) - buffer_offset if size is None else size)
        if buffer_offset < 0 or buffer_offset + self.size > len(buffer):
            raise ConfigError(
                f"region {name}: {self.size:#x} bytes at {buffer_offset:#x} overrun its mapping"
            )
        self.buffer = buffer
        self.buffer_offset = buffer_offset


class Rom(Ram):
    """Read-only memory (firmware, option ROMs): reads come from the mapping, writes exit to the VMM and are
    dropped (KVM_MEM_READONLY)."""

    readonly = True


class Io(Region):
    """A range decoded by a register-level device (MMIO or port I/O), which sees offsets into the region and
    says itself which thread serves which register (``on_vcpu``, read by the bus).  Ioeventfds live on the
    region at offsets, and so follow it wherever it is mapped: a BAR moved by the guest takes its queue
    notification eventfds along.
    """

    def __init__(self, name: str, size: int, device: BusDevice) -> None:
        super().__init__(name, size)
        self.device = device
        self.ioeventfds: list[IoEventFdSpec] = []

    def add_ioeventfd(self, offset: int, length: int, fd: int, datamatch: int | None = None) -> None:
        if length not in (1, 2, 4, 8) or not 0 <= offset <= self.size - length:
            raise ConfigError(f"region {self.name}: no {length}-byte ioeventfd at {offset:#x}")
        self.ioeventfds.append(IoEventFdSpec(offset, length, fd, datamatch))
        self._changed()

    def remove_ioeventfd(self, fd: int) -> None:
        kept = [e for e in self.ioeventfds if e.fd != fd]
        if len(kept) == len(self.ioeventfds):
            raise ConfigError(f"region {self.name}: no ioeventfd {fd}")
        self.ioeventfds = kept
        self._changed()


class Container(Region):
    """Holds other regions at offsets; decodes nothing itself (a hole reads as the bus floating)."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__(name, size)
        self._children: list[Region] = []

    @property
    def children(self) -> tuple[Region, ...]:
        """Highest precedence first: higher priority, then the later added."""
        return tuple(sorted(self._children, key=lambda r: (r.priority, r.seq), reverse=True))

    def add(self, child: Region, offset: int, priority: int = 0) -> None:
        if child.parent is not None or child._space is not None:
            raise ConfigError(f"region {child.name} is already placed")
        if offset < 0 or offset + child.size > self.size:
            raise ConfigError(
                f"region {child.name} at {offset:#x}+{child.size:#x} does not fit in {self.name} ({self.size:#x})"
            )
        if not self.users().isdisjoint(child.shown()):
            raise ConfigError(f"region {child.name} in {self.name} would contain itself (through an alias?)")
        child.parent, child.offset, child.priority, child.seq = self, offset, priority, next(_seq)
        self._children.append(child)
        if isinstance(child, Alias):
            child.target._aliases.append(child)  # so a change in the target reaches this tree
        self._changed()

    def remove(self, child: Region) -> None:
        if child.parent is not self:
            raise ConfigError(f"region {child.name} is not in {self.name}")
        self._children.remove(child)
        child.parent = None
        if isinstance(child, Alias):
            child.target._aliases.remove(child)
        self._changed()

    def move(self, child: Region, offset: int) -> None:
        """Place ``child`` at another offset, keeping its priority; on top of equal-priority siblings, as
        if just added (the guest moved it last)."""
        if child.parent is not self:
            raise ConfigError(f"region {child.name} is not in {self.name}")
        if offset < 0 or offset + child.size > self.size:
            raise ConfigError(f"region {child.name} at {offset:#x} does not fit in {self.name}")
        child.offset, child.seq = offset, next(_seq)
        self._changed()


class Alias(Region):
    """``size`` bytes of ``target`` from ``target_offset``, shown wherever the alias is placed (QEMU's
    memory_region_init_alias): the PCI memory space through the board's holes, without copying the tree."""

    def __init__(self, name: str, target: Region, target_offset: int, size: int) -> None:
        super().__init__(name, size)
        if target_offset < 0 or target_offset + size > target.size:
            raise ConfigError(
                f"alias {name}: {target_offset:#x}+{size:#x} is outside {target.name} ({target.size:#x})"
            )
        self.target = target
        self.target_offset = target_offset

    def targets(self) -> list[Region]:
        return [self.target]
