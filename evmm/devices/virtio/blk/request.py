"""virtio-blk requests (virtio 1.2 §5.2.6), parsed from a descriptor chain with no I/O.

A request is a 16-byte header (type, reserved, sector) in the device-readable part of the chain, then data,
then one status byte: the LAST device-writable byte (§5.2.6).  Data is device-readable for OUT, DISCARD and
WRITE_ZEROES, device-writable for IN and GET_ID.  The driver may frame these any way it likes (§2.6.4: the
header may share a descriptor with data), so the parser works on byte ranges of guest memory, never on
descriptor boundaries, and hands the device the data as guest-physical spans for zero-copy I/O.

``parse_request`` never raises on guest input: every chain yields a ``BlockRequest`` to carry out or a
``BadRequest`` with the status to report (``VIRTIO_BLK_S_IOERR`` or ``VIRTIO_BLK_S_UNSUPP``).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from evmm.devices.virtio.chain import Descriptor
from evmm.errors import GuestMemoryError
from evmm.record import record

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT  # the protocol's unit whatever blk_size says (§5.2.5)

# Request types (§5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status byte values (§5.2.6).
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20  # GET_ID: a NUL-padded ASCII string of up to 20 bytes (§5.2.6)
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1  # the only defined flag of a discard/write-zeroes segment

HEADER = struct.Struct("<IIQ")  # struct virtio_blk_req: le32 type, le32 reserved, le64 sector
SEGMENT = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: le64 sector, le32 num, le32 flags


class Kind(enum.IntEnum):
    """The request types evmm carries out; the rest are answered UNSUPP."""

    IN = VIRTIO_BLK_T_IN
    OUT = VIRTIO_BLK_T_OUT
    FLUSH = VIRTIO_BLK_T_FLUSH
    GET_ID = VIRTIO_BLK_T_GET_ID
    DISCARD = VIRTIO_BLK_T_DISCARD
    WRITE_ZEROES = VIRTIO_BLK_T_WRITE_ZEROES


WRITES = frozenset({Kind.OUT, Kind.DISCARD, Kind.WRITE_ZEROES})  # refused on a read-only drive (§5.2.6.2)
_KINDS = {int(k): k for k in Kind}  # a dict lookup: calling the IntEnum costs a microsecond per request


class MemoryReader(Protocol):
    """What the parser needs of guest memory: bounds-checked reads (``GuestMemory`` is one)."""

    def read(self, gpa: int, length: int) -> bytes: ...


# NamedTuples, not frozen dataclasses: every request makes several, and a tuple is built ~4x faster.
class Span(NamedTuple):
    """A guest-physical byte range."""

    addr: int
    length: int


class Range(NamedTuple):
    """One segment of a DISCARD or WRITE_ZEROES request, in 512-byte sectors."""

    sector: int
    num_sectors: int
    unmap: bool


@record(frozen=True, slots=True)
class Limits:
    """What the device told the driver (config space §5.2.4, features §5.2.3), to hold requests to."""

    capacity: int  # sectors
    seg_max: int
    size_max: int
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    readonly: bool = False
    discard: bool = True  # VIRTIO_BLK_F_DISCARD negotiated
    write_zeroes: bool = True  # VIRTIO_BLK_F_WRITE_ZEROES negotiated


class BlockRequest(NamedTuple):
    kind: Kind
    sector: int
    data: tuple[Span, ...]  # IN, GET_ID: device-writable; OUT: device-readable; otherwise empty
    ranges: tuple[Range, ...]  # DISCARD, WRITE_ZEROES
    status_addr: int

    @property
    def data_len(self) -> int:
        return sum(s.length for s in self.data)

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT


class BadRequest(NamedTuple):
    status: int  # VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP
    status_addr: int | None  # None: the chain has no device-writable byte to hold a status
    reason: str


def _split(spans: Sequence[Span], n: int) -> tuple[list[Span], list[Span]]:
    """The first ``n`` bytes of ``spans`` and the rest, cutting a span where the boundary falls inside it."""
    head: list[Span] = []
    tail: list[Span] = []
    for s in spans:
        if n <= 0:
            tail.append(s)
        elif s.length <= n:
            head.append(s)
            n -= s.length
        else:
            head.append(Span(s.addr, n))
            tail.append(Span(s.addr + n, s.length - n))
            n = 0
    return head, tail


def _total(spans: Sequence[Span]) -> int:
    n = 0
    for s in spans:
        n += s.length
    return n


def _gather(mem: MemoryReader, spans: Sequence[Span]) -> bytes:
    return b"".join(mem.read(s.addr, s.length) for s in spans)


def parse_request(
    descriptors: Sequence[Descriptor], mem: MemoryReader, limits: Limits
) -> BlockRequest | BadRequest:
    """Turn a validated descriptor chain into a request to carry out, or the status to answer it with."""
    try:
        return _parse(descriptors, mem, limits)
    except (GuestMemoryError, ValueError, OverflowError, struct.error) as e:
        # Defence in depth: the chain walker already checked every buffer lies in guest RAM.
        writable = [Span(d.addr, d.length) for d in descriptors if d.writable and d.length > 0]
        status = writable[-1].addr + writable[-1].length - 1 if writable else None
        return BadRequest(VIRTIO_BLK_S_IOERR, status, f"unreadable request: {e}")


def _parse(descriptors: Sequence[Descriptor], mem: MemoryReader, limits: Limits) -> BlockRequest | BadRequest:
    readable: list[Span] = []
    writable: list[Span] = []
    for d in descriptors:
        if d.length:
            (writable if d.writable else readable).append(Span(d.addr, d.length))
    if not writable:
        return BadRequest(VIRTIO_BLK_S_IOERR, None, "no device-writable status byte")
    # The status is the last writable byte; Linux gives it a descriptor of its own.
    last = writable[-1]
    status_addr = last.addr + last.length - 1
    out_data = writable[:-1] if last.length == 1 else [*writable[:-1], Span(last.addr, last.length - 1)]

    def bad(reason: str, status: int = VIRTIO_BLK_S_IOERR) -> BadRequest:
        return BadRequest(status, status_addr, reason)

    if readable and readable[0].length == HEADER.size:  # Linux's layout: the header alone
        header_spans, payload = readable[:1], readable[1:]
    else:
        header_spans, payload = _split(readable, HEADER.size)
    if _total(header_spans) < HEADER.size:
        return bad(f"request header is {_total(header_spans)} bytes, not {HEADER.size}")
    if len(header_spans) == 1:
        head = mem.read(header_spans[0].addr, HEADER.size)
    else:
        head = _gather(mem, header_spans)
    rtype, _reserved, sector = HEADER.unpack(head)

    kind = _KINDS.get(rtype)
    if kind is None:
        return bad(f"request type {rtype} is not supported", VIRTIO_BLK_S_UNSUPP)
    if kind is Kind.DISCARD and not limits.discard:
        return bad("DISCARD was not negotiated", VIRTIO_BLK_S_UNSUPP)
    if kind is Kind.WRITE_ZEROES and not limits.write_zeroes:
        return bad("WRITE_ZEROES was not negotiated", VIRTIO_BLK_S_UNSUPP)
    if limits.readonly and kind in WRITES:
        # §5.2.6.2: IOERR for a write to a read-only device, and no data written.
        return bad(f"{kind.name} on a read-only drive")

    if kind is Kind.FLUSH:
        # The driver MUST set sector 0 and SHOULD NOT add data (§5.2.6.1); like QEMU, ignore both.
        return BlockRequest(kind, 0, (), (), status_addr)
    if kind is Kind.GET_ID:
        if payload:
            return bad("GET_ID with device-readable data")
        return BlockRequest(kind, 0, tuple(out_data), (), status_addr)
    if kind in (Kind.IN, Kind.OUT):
        return _parse_rw(kind, sector, payload, out_data, status_addr, limits)
    return _parse_ranges(kind, payload, out_data, mem, status_addr, limits)


def _parse_rw(
    kind: Kind, sector: int, payload: list[Span], out_data: list[Span], status_addr: int, limits: Limits
) -> BlockRequest | BadRequest:
    data, wrong = (out_data, payload) if kind is Kind.IN else (payload, out_data)
    if wrong:
        direction = "device-readable" if kind is Kind.IN else "device-writable"
        return BadRequest(VIRTIO_BLK_S_IOERR, status_addr, f"{kind.name} with {direction} data")
    length = _total(data)
    reason = None
    if length % SECTOR_SIZE:
        reason = f"{kind.name} of {length} bytes, not a multiple of {SECTOR_SIZE}"
    elif sector + (length >> SECTOR_SHIFT) > limits.capacity:
        reason = f"{kind.name} of sectors {sector}+{length >> SECTOR_SHIFT} beyond capacity {limits.capacity}"
    elif len(data) > limits.seg_max:
        reason = f"{kind.name} in {len(data)} segments, more than seg_max {limits.seg_max}"
    elif any(s.length > limits.size_max for s in data):
        reason = f"{kind.name} with a segment larger than size_max {limits.size_max}"
    if reason is not None:
        return BadRequest(VIRTIO_BLK_S_IOERR, status_addr, reason)
    return BlockRequest(kind, sector, tuple(data), (), status_addr)


def _parse_ranges(
    kind: Kind,
    payload: list[Span],
    out_data: list[Span],
    mem: MemoryReader,
    status_addr: int,
    limits: Limits,
) -> BlockRequest | BadRequest:
    def bad(reason: str, status: int = VIRTIO_BLK_S_IOERR) -> BadRequest:
        return BadRequest(status, status_addr, reason)

    if kind is Kind.DISCARD:
        max_seg, max_sectors = limits.max_discard_seg, limits.max_discard_sectors
    else:
        max_seg, max_sectors = limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors
    if out_data:
        return bad(f"{kind.name} with device-writable data")
    length = _total(payload)
    if length == 0 or length % SEGMENT.size:
        return bad(f"{kind.name} data of {length} bytes is not whole {SEGMENT.size}-byte segments")
    count = length // SEGMENT.size
    if count > max_seg:
        return bad(f"{kind.name} of {count} segments, more than {max_seg}")
    raw = _gather(mem, payload)  # at most max_seg * 16 bytes, checked just above
    ranges = []
    for i in range(count):
        sector, num, flags = SEGMENT.unpack_from(raw, i * SEGMENT.size)
        # §5.2.6.2: UNSUPP for unknown flags, and for UNMAP on a discard.
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return bad(f"{kind.name} segment flags {flags:#x} are unknown", VIRTIO_BLK_S_UNSUPP)
        unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        if kind is Kind.DISCARD and unmap:
            return bad("DISCARD with the UNMAP flag", VIRTIO_BLK_S_UNSUPP)
        if num > max_sectors:
            return bad(f"{kind.name} of {num} sectors, more than {max_sectors}")
        if sector + num > limits.capacity:
            return bad(f"{kind.name} of sectors {sector}+{num} beyond capacity {limits.capacity}")
        ranges.append(Range(sector, num, unmap))
    return BlockRequest(kind, 0, (), tuple(ranges), status_addr)


__all__ = [
    "SECTOR_SIZE",
    "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "BadRequest",
    "BlockRequest",
    "Kind",
    "Limits",
    "MemoryReader",
    "Range",
    "Span",
    "parse_request",
]
