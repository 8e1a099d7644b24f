"""virtio-blk request parsing (virtio 1.2 §5.2.6), byte for byte, and fuzzed: any chain gives a request or a status."""

from __future__ import annotations

import struct

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from evmm.devices.virtio.blk.request import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP,
    BadRequest,
    BlockRequest,
    Kind,
    Limits,
    Range,
    Span,
    parse_request,
)
from evmm.devices.virtio.chain import Descriptor
from evmm.memory import GuestMemory

MEM = GuestMemory.anonymous([(0, 1 << 20)])
HDR = 0x1000  # where tests put request headers
DATA = 0x10000
STATUS = 0x8000
LIMITS = Limits(
    capacity=1000,
    seg_max=4,
    size_max=8192,
    max_discard_sectors=64,
    max_discard_seg=2,
    max_write_zeroes_sectors=128,
    max_write_zeroes_seg=3,
)


def header(rtype: int, sector: int = 0, reserved: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, reserved, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


def r(addr: int, n: int) -> Descriptor:
    return Descriptor(addr, n, False)


def w(addr: int, n: int) -> Descriptor:
    return Descriptor(addr, n, True)


def parse(descs: list[Descriptor], limits: Limits = LIMITS) -> BlockRequest | BadRequest:
    return parse_request(descs, MEM, limits)


def put(addr: int, data: bytes) -> int:
    MEM.write(addr, data)
    return len(data)


def test_read_request() -> None:
    put(HDR, header(0, sector=8))
    req = parse([r(HDR, 16), w(DATA, 1024), w(STATUS, 1)])
    assert req == BlockRequest(Kind.IN, 8, (Span(DATA, 1024),), (), STATUS)
    assert (req.data_len, req.offset) == (1024, 8 * 512)


def test_write_request_with_header_and_data_in_one_buffer() -> None:
    # §2.6.4: the device must not assume framing; here the header and data share one descriptor.
    put(HDR, header(1, sector=3) + b"x" * 512)
    req = parse([r(HDR, 16 + 512), w(STATUS, 1)])
    assert req == BlockRequest(Kind.OUT, 3, (Span(HDR + 16, 512),), (), STATUS)


def test_header_split_over_descriptors_and_status_sharing_the_data_buffer() -> None:
    hdr = header(0, sector=0x0102030405)
    put(HDR, hdr[:5])
    put(HDR + 0x100, hdr[5:])
    limits = Limits(1 << 40, 4, 8192, 1, 1, 1, 1)
    req = parse([r(HDR, 5), r(HDR + 0x100, 11), w(DATA, 512 + 1)], limits)
    # The status is the LAST writable byte, even when it shares a descriptor with data.
    assert req == BlockRequest(Kind.IN, 0x0102030405, (Span(DATA, 512),), (), DATA + 512)


def test_zero_length_descriptors_are_skipped() -> None:
    put(HDR, header(0))
    req = parse([r(HDR, 16), r(HDR + 64, 0), w(DATA, 512), w(DATA + 4096, 1), w(STATUS, 0)])
    assert req == BlockRequest(Kind.IN, 0, (Span(DATA, 512),), (), DATA + 4096)


def test_multi_segment_write() -> None:
    put(HDR, header(1, sector=10))
    req = parse([r(HDR, 16), r(DATA, 512), r(DATA + 0x1000, 1024), r(DATA + 0x2000, 2560), w(STATUS, 1)])
    assert isinstance(req, BlockRequest)
    assert req.data == (Span(DATA, 512), Span(DATA + 0x1000, 1024), Span(DATA + 0x2000, 2560))
    assert req.data_len == 4096


def test_flush_ignores_sector_and_data() -> None:
    put(HDR, header(4, sector=77))
    assert parse([r(HDR, 16), w(STATUS, 1)]) == BlockRequest(Kind.FLUSH, 0, (), (), STATUS)
    assert parse([r(HDR, 16 + 8), w(STATUS, 1)]) == BlockRequest(Kind.FLUSH, 0, (), (), STATUS)


def test_get_id() -> None:
    put(HDR, header(8))
    assert parse([r(HDR, 16), w(DATA, 20), w(STATUS, 1)]) == BlockRequest(
        Kind.GET_ID, 0, (Span(DATA, 20),), (), STATUS
    )
    bad = parse([r(HDR, 16 + 4), w(DATA, 20), w(STATUS, 1)])
    assert isinstance(bad, BadRequest) and bad.status == VIRTIO_BLK_S_IOERR


def test_discard_and_write_zeroes_segments() -> None:
    n = put(HDR, header(11) + seg(0, 8) + seg(992, 8))
    assert parse([r(HDR, n), w(STATUS, 1)]) == BlockRequest(
        Kind.DISCARD, 0, (), (Range(0, 8, False), Range(992, 8, False)), STATUS
    )
    n = put(HDR, header(13) + seg(100, 128, 1) + seg(5, 1))
    assert parse([r(HDR, n), w(STATUS, 1)]) == BlockRequest(
        Kind.WRITE_ZEROES, 0, (), (Range(100, 128, True), Range(5, 1, False)), STATUS
    )


@pytest.mark.parametrize(
    ("payload", "status", "why"),
    [
        (header(11) + seg(0, 8, 1), VIRTIO_BLK_S_UNSUPP, "UNMAP"),  # §5.2.6.2: unmap on a discard
        (header(11) + seg(0, 8, 2), VIRTIO_BLK_S_UNSUPP, "flags"),  # unknown flag
        (header(13) + seg(0, 8, 0x80000001), VIRTIO_BLK_S_UNSUPP, "flags"),
        (header(11) + seg(0, 1) * 3, VIRTIO_BLK_S_IOERR, "3 segments"),  # max_discard_seg 2
        (header(13) + seg(0, 1) * 4, VIRTIO_BLK_S_IOERR, "4 segments"),  # max_write_zeroes_seg 3
        (header(11) + seg(0, 65), VIRTIO_BLK_S_IOERR, "65 sectors"),  # max_discard_sectors 64
        (header(13) + seg(999, 2), VIRTIO_BLK_S_IOERR, "beyond capacity"),
        (header(13) + seg(2**64 - 1, 2**32 - 1), VIRTIO_BLK_S_IOERR, "more than"),
        (header(11) + seg(0, 1)[:10], VIRTIO_BLK_S_IOERR, "whole 16-byte segments"),
        (header(11), VIRTIO_BLK_S_IOERR, "whole 16-byte segments"),
    ],
)
def test_bad_discard_and_write_zeroes(payload: bytes, status: int, why: str) -> None:
    n = put(HDR, payload)
    req = parse([r(HDR, n), w(STATUS, 1)])
    assert isinstance(req, BadRequest)
    assert (req.status, req.status_addr) == (status, STATUS)
    assert why in req.reason


def test_discard_and_write_zeroes_need_their_features() -> None:
    limits = Limits(1000, 4, 8192, 64, 2, 64, 2, discard=False, write_zeroes=False)
    for rtype in (11, 13):
        n = put(HDR, header(rtype) + seg(0, 8))
        req = parse([r(HDR, n), w(STATUS, 1)], limits)
        assert isinstance(req, BadRequest) and req.status == VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize(
    ("sector", "descs", "why"),
    [
        (0, [r(HDR, 16), w(DATA, 1000), w(STATUS, 1)], "not a multiple of 512"),
        (996, [r(HDR, 16), w(DATA, 512 * 5), w(STATUS, 1)], "beyond capacity"),  # ends at 1001
        (2**64 - 1, [r(HDR, 16), w(DATA, 512), w(STATUS, 1)], "beyond capacity"),
        (0, [r(HDR, 16), *[w(DATA + 0x1000 * i, 512) for i in range(5)], w(STATUS, 1)], "seg_max"),
        (0, [r(HDR, 16 + 512), w(DATA, 512), w(STATUS, 1)], "device-readable data"),
        (0, [r(HDR, 12), w(DATA, 512), w(STATUS, 1)], "header is 12 bytes"),
    ],
)
def test_bad_reads(sector: int, descs: list[Descriptor], why: str) -> None:
    put(HDR, header(0, sector=sector))
    req = parse(descs)
    assert isinstance(req, BadRequest)
    assert (req.status, req.status_addr) == (VIRTIO_BLK_S_IOERR, STATUS)
    assert why in req.reason


def test_size_max_and_exact_capacity() -> None:
    put(HDR, header(1, sector=0))
    limits = Limits(1000, 4, 4096, 1, 1, 1, 1)
    req = parse([r(HDR, 16), r(DATA, 8192), w(STATUS, 1)], limits)
    assert isinstance(req, BadRequest) and "size_max" in req.reason
    put(HDR, header(1, sector=992))
    assert isinstance(parse([r(HDR, 16), r(DATA, 4096), w(STATUS, 1)], limits), BlockRequest)  # ends at 1000


def test_write_with_device_writable_data_is_refused() -> None:
    put(HDR, header(1))
    req = parse([r(HDR, 16), w(DATA, 512), w(STATUS, 1)])
    assert isinstance(req, BadRequest) and "device-writable data" in req.reason


def test_read_only_refuses_every_write_kind() -> None:
    ro = Limits(1000, 4, 8192, 64, 2, 64, 2, readonly=True)
    for payload in (header(1) + b"\0" * 512, header(11) + seg(0, 8), header(13) + seg(0, 8)):
        n = put(HDR, payload)
        req = parse([r(HDR, n), w(STATUS, 1)], ro)
        assert isinstance(req, BadRequest) and req.status == VIRTIO_BLK_S_IOERR and "read-only" in req.reason
    put(HDR, header(0))
    assert isinstance(parse([r(HDR, 16), w(DATA, 512), w(STATUS, 1)], ro), BlockRequest)
    put(HDR, header(4))
    assert isinstance(parse([r(HDR, 16), w(STATUS, 1)], ro), BlockRequest)


@pytest.mark.parametrize("rtype", [2, 3, 10, 14, 15, 16, 0xFFFFFFFF])
def test_unknown_types_are_unsupported(rtype: int) -> None:
    put(HDR, header(rtype))
    req = parse([r(HDR, 16), w(DATA, 512), w(STATUS, 1)])
    assert isinstance(req, BadRequest)
    assert (req.status, req.status_addr) == (VIRTIO_BLK_S_UNSUPP, STATUS)


def test_no_status_byte() -> None:
    put(HDR, header(1))
    req = parse([r(HDR, 16 + 512)])
    assert isinstance(req, BadRequest) and req.status_addr is None


def test_buffer_outside_ram_is_an_error_not_an_exception() -> None:
    # The chain walker never lets this through; the parser copes anyway.
    req = parse([r(0xFFFF_FFFF_0000, 16), w(STATUS, 1)])
    assert isinstance(req, BadRequest) and req.status_addr == STATUS


# ---- fuzzing ----------------------------------------------------------------------------------------------

FUZZ_BASE = 0x20000
KNOWN_TYPES = [0, 1, 0, 1, 4, 8, 11, 13, 11, 13, 10, 14]  # reads, writes, discards twice as often


@st.composite
def chains(draw: st.DrawFn) -> tuple[list[Descriptor], bytes]:
    """A chain the way a driver might build it -- header, segments or data, status -- cut at random places,
    with a few descriptors moved anywhere at all or turned around; and the bytes its readable part holds."""
    rare = st.sampled_from([False] * 9 + [True])  # hypothesis favours 0 and the bounds of integers()
    rtype = draw(st.integers(0, 2**32 - 1)) if draw(rare) else draw(st.sampled_from(KNOWN_TYPES))
    sector = draw(st.integers(0, 2**64 - 1)) if draw(rare) else draw(st.integers(0, 1100))
    ranges = st.tuples(st.integers(0, 1100), st.integers(0, 200), st.sampled_from([0, 0, 0, 1, 2, 1 << 31]))
    segments = draw(st.lists(ranges, max_size=4)) if rtype in (11, 13) or draw(rare) else []
    blob = header(rtype, sector) + b"".join(seg(*x) for x in segments)
    if rtype == 1 or draw(rare):
        blob += bytes(draw(st.sampled_from([0, 7, 512, 1024, 4096])))
    cuts = sorted(draw(st.lists(st.integers(0, len(blob)), max_size=3)))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    if draw(rare):
        sizes = draw(st.lists(st.sampled_from([0, 1, 20, 511, 512, 1024, 4096, 8192]), max_size=4))
    elif rtype == 0:
        sizes = draw(st.lists(st.sampled_from([512, 1024, 4096]), min_size=1, max_size=4))
    else:
        sizes = [20] if rtype == 8 else []
    sizes += [] if draw(rare) else [1]
    descs = []
    pos = FUZZ_BASE
    for n in lengths:
        descs.append(Descriptor(pos, n, False))
        pos += n
    for n in sizes:
        descs.append(Descriptor(pos, n, True))
        pos += n
    for _ in range(draw(st.integers(1, 2)) if draw(rare) else 0):
        if not descs:
            break
        i = draw(st.integers(0, len(descs) - 1))
        d = descs[i]
        if draw(st.booleans()):
            descs[i] = Descriptor(draw(st.integers(0, 2**64 - 1)), d.length, d.writable)  # anywhere at all
        else:
            descs[i] = Descriptor(d.addr, d.length, not d.writable)
    return descs, blob


def _fuzz(chain: tuple[list[Descriptor], bytes], limits: Limits) -> None:
    descs, blob = chain
    MEM.fill(FUZZ_BASE, 0x30000)
    MEM.write(FUZZ_BASE, blob)  # readable descriptors at FUZZ_BASE see the header and segments
    req = parse(descs, limits)
    event(f"request {req.kind.name}" if isinstance(req, BlockRequest) else f"status {req.status}")
    writable = [d for d in descs if d.writable and d.length]
    if isinstance(req, BadRequest):
        assert req.status in (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)
        if writable:
            assert req.status_addr == writable[-1].addr + writable[-1].length - 1
        else:
            assert req.status_addr is None
        return
    assert isinstance(req, BlockRequest)
    assert req.status_addr == writable[-1].addr + writable[-1].length - 1
    if req.kind in (Kind.IN, Kind.OUT):
        assert req.data_len % 512 == 0
        assert req.sector + req.data_len // 512 <= limits.capacity
        assert len(req.data) <= limits.seg_max
        assert all(0 < s.length <= limits.size_max for s in req.data)
        # Every data span lies inside one descriptor of the right direction.
        want_writable = req.kind is Kind.IN
        for s in req.data:
            assert any(
                d.writable == want_writable and d.addr <= s.addr and s.addr + s.length <= d.addr + d.length
                for d in descs
            )
    for rg in req.ranges:
        assert rg.sector + rg.num_sectors <= limits.capacity
    if limits.readonly:
        assert req.kind not in (Kind.OUT, Kind.DISCARD, Kind.WRITE_ZEROES)


fuzz_limits = st.builds(
    Limits,
    capacity=st.integers(0, 2000),
    seg_max=st.integers(1, 8),
    size_max=st.sampled_from([512, 4096, 1 << 20]),
    max_discard_sectors=st.integers(0, 256),
    max_discard_seg=st.integers(1, 4),
    max_write_zeroes_sectors=st.integers(0, 256),
    max_write_zeroes_seg=st.integers(1, 4),
    readonly=st.sampled_from([False, False, False, True]),
    discard=st.sampled_from([True] * 9 + [False]),
    write_zeroes=st.sampled_from([True] * 9 + [False]),
)


@settings(max_examples=500, deadline=None)
@given(chains(), fuzz_limits)
def test_fuzz_any_chain_gives_a_request_or_a_status(
    chain: tuple[list[Descriptor], bytes], limits: Limits
) -> None:
    _fuzz(chain, limits)


@pytest.mark.long
def test_fuzz_request_parsing_long(request: pytest.FixtureRequest) -> None:
    """100k examples (about 10-20 minutes here): opt in with ``-m long``."""
    if "long" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a long fuzzing run: select it with -m long")

    @settings(max_examples=100_000, deadline=None)
    @given(chains(), fuzz_limits)
    def run(chain: tuple[list[Descriptor], bytes], limits: Limits) -> None:
        _fuzz(chain, limits)

    run()
