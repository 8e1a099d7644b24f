"""Flattening a region tree into what the guest sees: sorted, non-overlapping ranges, each owned by one RAM,
ROM or I/O region, and the ioeventfds of the I/O regions at the addresses where they are visible.

Rendering goes down the tree in precedence order (QEMU's render_memory_region, StratoVirt's
render_region_pass): a container's children highest priority first and, at equal priority, the one added
(or moved) last first; each terminal region takes only the parts of its range that nothing of higher
precedence took.  An alias renders its target shifted, clipped to the alias's own window.  Holes (no region,
or only containers) are absent: an access there reaches no device.

``diff`` says what changed between two views, the input of every listener.  Pure: no I/O.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from evmm.address_space.region import Alias, Container, Io, Ram, Region
from evmm.record import record


@record(frozen=True)
class FlatRange:
    """``size`` bytes at ``start`` decoded by ``region`` from its offset ``offset_in_region``."""

    start: int
    size: int
    region: Region
    offset_in_region: int

    @property
    def end(self) -> int:
        return self.start + self.size


@record(frozen=True)
class IoEventFd:
    """An ioeventfd at an absolute address of the space (what KVM_IOEVENTFD takes)."""

    addr: int
    length: int
    fd: int
    datamatch: int | None
    region: Io


class FlatView:
    def __init__(self, ranges: Iterable[FlatRange] = (), ioeventfds: Iterable[IoEventFd] = ()) -> None:
        self.ranges = tuple(sorted(ranges, key=lambda r: r.start))
        self.ioeventfds = tuple(sorted(ioeventfds, key=lambda e: (e.addr, e.fd)))
        self._starts = [r.start for r in self.ranges]

    def find(self, addr: int) -> FlatRange | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.ranges[i].end:
            return self.ranges[i]
        return None

    def __repr__(self) -> str:
        return "FlatView(" + ", ".join(f"{r.start:#x}+{r.size:#x}:{r.region.name}" for r in self.ranges) + ")"


class _Renderer:
    def __init__(self) -> None:
        self.pieces: list[FlatRange] = []  # sorted by start, non-overlapping
        self._starts: list[int] = []

    def render(self, region: Region, base: int, lo: int, hi: int) -> None:
        """Show ``region`` placed at absolute ``base``, clipped to ``[lo, hi)``.  No loops: ``Container.add``
        refuses a region that would show itself."""
        lo, hi = max(lo, base), min(hi, base + region.size)
        if lo >= hi:
            return
        if isinstance(region, Container):
            for child in region.children:
                self.render(child, base + child.offset, lo, hi)
        elif isinstance(region, Alias):
            self.render(region.target, base - region.target_offset, lo, hi)
        else:
            self._fill(region, base, lo, hi)

    def _fill(self, region: Region, base: int, lo: int, hi: int) -> None:
        """Take the gaps of ``[lo, hi)`` that nothing of higher precedence took."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if i >= 0 and self.pieces[i].end > lo:
            lo = self.pieces[i].end
        i += 1
        gaps = []
        while lo < hi:
            next_start = self.pieces[i].start if i < len(self.pieces) else hi
            if next_start > lo:
                gaps.append((lo, min(next_start, hi)))
            if i >= len(self.pieces):
                break
            lo = max(lo, self.pieces[i].end)
            i += 1
        for start, end in gaps:
            j = bisect.bisect_left(self._starts, start)
            self.pieces.insert(j, FlatRange(start, end - start, region, start - base))
            self._starts.insert(j, start)


def flatten(root: Region, base: int = 0) -> FlatView:
    r = _Renderer()
    r.render(root, base, base, base + root.size)
    return FlatView(r.pieces, _ioeventfds(r.pieces))


def _ioeventfds(pieces: list[FlatRange]) -> list[IoEventFd]:
    """An I/O region's ioeventfds where the region is visible; one half hidden hides the whole eventfd (KVM
    cannot signal for part of a write)."""
    out = []
    for fr in pieces:
        if not isinstance(fr.region, Io):
            continue
        for e in fr.region.ioeventfds:
            if fr.offset_in_region <= e.offset and e.offset + e.length <= fr.offset_in_region + fr.size:
                addr = fr.start + e.offset - fr.offset_in_region
                out.append(IoEventFd(addr, e.length, e.fd, e.datamatch, fr.region))
    return out


def ram_ranges(view: FlatView) -> list[FlatRange]:
    return [r for r in view.ranges if isinstance(r.region, Ram)]


@record(frozen=True)
class ViewDiff:
    removed: tuple[FlatRange, ...]
    added: tuple[FlatRange, ...]
    ioeventfds_removed: tuple[IoEventFd, ...]
    ioeventfds_added: tuple[IoEventFd, ...]

    @property
    def empty(self) -> bool:
        return not (self.removed or self.added or self.ioeventfds_removed or self.ioeventfds_added)


def diff(old: FlatView, new: FlatView) -> ViewDiff:
    """What a listener must undo (old only) and do (new only), each in address order."""
    old_ranges, new_ranges = set(old.ranges), set(new.ranges)
    old_fds, new_fds = set(old.ioeventfds), set(new.ioeventfds)
    return ViewDiff(
        removed=tuple(r for r in old.ranges if r not in new_ranges),
        added=tuple(r for r in new.ranges if r not in old_ranges),
        ioeventfds_removed=tuple(e for e in old.ioeventfds if e not in new_fds),
        ioeventfds_added=tuple(e for e in new.ioeventfds if e not in old_fds),
    )
