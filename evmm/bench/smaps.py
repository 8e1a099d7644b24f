"""A VMM's memory overhead from ``/proc/PID/smaps``, as Firecracker's memory-overhead test measures it.

Every mapping's ``Rss`` counts; the guest RAM mapping's ``Rss`` is guest memory (the pages the guest touched),
everything else is the VMM's own: interpreter, libraries, heap, thread stacks, device buffers.  The guest RAM
is found by size: one anonymous mapping per RAM region, exactly the region's size or a little more (QEMU may
round a RAM block up to its alignment).  Parsing is pure, for unit tests; ``read`` does the I/O.
"""

from __future__ import annotations

import re
from pathlib import Path

from evmm.record import record

KiB = 1024
MiB = 1 << 20
# A RAM block may be padded to its alignment (QEMU aligns guest RAM to 2 MiB for transparent huge pages).
SLACK = 4 * MiB
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


class SmapsError(Exception):
    pass


@record(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    path: str  # "" for anonymous memory, "[heap]", "[stack]", or a file
    rss: int  # bytes

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[anon")


@record(frozen=True)
class Usage:
    total: int  # bytes resident, every mapping
    guest: int  # bytes resident in the guest RAM mappings
    guest_mappings: int

    @property
    def overhead(self) -> int:
        return self.total - self.guest


def parse(text: str) -> list[Mapping]:
    """The mappings of one smaps file, with their ``Rss``."""
    out: list[Mapping] = []
    head: tuple[int, int, str, str] | None = None
    rss: int | None = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m is not None:
            if head is not None:
                out.append(Mapping(*head, (rss or 0) * KiB))
            head = (int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4).strip())
            rss = None
        elif line.startswith("Rss:") and head is not None:
            fields = line.split()
            if len(fields) < 2 or not fields[1].isdigit():
                raise SmapsError(f"bad Rss line: {line!r}")
            rss = int(fields[1])
    if head is not None:
        out.append(Mapping(*head, (rss or 0) * KiB))
    return out


def guest_mappings(mappings: list[Mapping], regions: list[int]) -> list[Mapping]:
    """For each guest RAM region size, the anonymous writable mapping that backs it.

    Where several mappings fit one size (two regions of the same size), the largest resident ones are taken,
    each mapping at most once.  ``SmapsError`` when a region has no mapping: the caller must not then guess.
    """
    chosen: list[Mapping] = []
    for size in sorted(regions, reverse=True):
        fits = [
            m
            for m in mappings
            if m.anonymous and "w" in m.perms and size <= m.size <= size + SLACK and m not in chosen
        ]
        if not fits:
            big = sorted((m for m in mappings if m.anonymous), key=lambda m: -m.size)[:4]
            seen = ", ".join(f"{m.size / MiB:.1f} MiB {m.perms}" for m in big)
            raise SmapsError(
                f"no anonymous mapping of {size // MiB} MiB (the guest RAM) in smaps; largest: {seen}"
            )
        chosen.append(max(fits, key=lambda m: (m.rss, -abs(m.size - size))))
    return chosen


def usage(mappings: list[Mapping], regions: list[int]) -> Usage:
    guest = guest_mappings(mappings, regions)
    return Usage(sum(m.rss for m in mappings), sum(m.rss for m in guest), len(guest))


def read(pid: int, regions: list[int]) -> Usage:
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError as e:
        raise SmapsError(f"cannot read /proc/{pid}/smaps: {e.strerror}") from None
    return usage(parse(text), regions)


def peak_rss(pid: int) -> int:
    """``VmHWM`` of ``/proc/PID/status``: the process's peak resident set, bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    raise SmapsError(f"no VmHWM in /proc/{pid}/status")
