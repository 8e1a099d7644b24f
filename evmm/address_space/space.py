"""An address space: a root container, its current flat view, and the listeners that act on each change.

Each change to the tree (a region added, removed or moved, an ioeventfd added) flattens it again and hands
the difference to every listener in the order KVM needs: first everything that went away (memory slots
deleted, ioeventfds deassigned, bus mappings removed), then everything new, so that a range that moved never
overlaps its old self.  ``transaction()`` groups changes (both halves of a 64-bit BAR, a whole board) into
one update.

A listener that fails (KVM refusing a slot) does not stop the others; the space keeps the new view and
raises the first error after every listener has had its say, so the caller (a config-space write) can fail
that one request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from evmm.address_space.flatview import FlatRange, FlatView, IoEventFd, ViewDiff, diff, flatten
from evmm.address_space.region import Container
from evmm.errors import ConfigError, EvmmError

T = TypeVar("T")


class Listener(Protocol):
    """Acts on what the guest sees: each range and ioeventfd appears once and disappears once."""

    def region_add(self, fr: FlatRange) -> None: ...

    def region_del(self, fr: FlatRange) -> None: ...

    def ioeventfd_add(self, e: IoEventFd) -> None: ...

    def ioeventfd_del(self, e: IoEventFd) -> None: ...


class AddressSpace:
    def __init__(self, name: str, root: Container) -> None:
        if root.parent is not None or root._space is not None:
            raise ConfigError(f"address space {name}: its root {root.name} is already placed")
        self.name = name
        self.root = root
        self.view = FlatView()
        self._listeners: list[Listener] = []
        self._depth = 0
        self._pending = False
        root._space = self
        self.update()

    def add_listener(self, listener: Listener) -> None:
        """Attach ``listener`` and show it everything already visible, as if it had been there all along."""
        self._listeners.append(listener)
        self._apply([listener], diff(FlatView(), self.view))

    def remove_listener(self, listener: Listener) -> None:
        """Detach ``listener``, undoing everything it was shown (KVM slots, ioeventfds)."""
        self._listeners.remove(listener)
        self._apply([listener], diff(self.view, FlatView()))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Changes inside reach the listeners once, when the outermost transaction ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pending:
                self.update()

    def update(self) -> None:
        if self._depth:
            self._pending = True
            return
        self._pending = False
        new = flatten(self.root)
        change = diff(self.view, new)
        self.view = new
        if not change.empty:
            self._apply(self._listeners, change)

    def _apply(self, listeners: list[Listener], change: ViewDiff) -> None:
        errors: list[EvmmError] = []

        def each(fn: Callable[[T], None], items: tuple[T, ...]) -> None:
            for item in items:
                try:
                    fn(item)
                except EvmmError as e:
                    errors.append(e)

        for listener in listeners:
            each(listener.ioeventfd_del, change.ioeventfds_removed)
            each(listener.region_del, change.removed)
            each(listener.region_add, change.added)
            each(listener.ioeventfd_add, change.ioeventfds_added)
        if errors:
            raise errors[0]
