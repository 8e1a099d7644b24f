"""The vsock packet header (virtio 1.2 §5.10.6) and the hybrid CONNECT line: pure parsing, fuzzed."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.virtio.vsock.packet import (
    HDR_SIZE,
    HOST_CID,
    TYPE_STREAM,
    Header,
    Op,
    check_tx,
    parse_header,
    reply_header,
)
from evmm.devices.virtio.vsock.unix import parse_connect_line

GUEST = 3


def guest_hdr(op: int = Op.RW, n: int = 0, **kw: int) -> Header:
    fields: dict[str, int] = {
        "src_cid": GUEST,
        "dst_cid": HOST_CID,
        "src_port": 1234,
        "dst_port": 52,
        "len": n,
        "type": TYPE_STREAM,
        "op": op,
        "flags": 0,
        "buf_alloc": 65536,
        "fwd_cnt": 0,
    }
    fields.update(kw)
    return Header(**fields)


def test_layout_is_the_spec_struct() -> None:
    h = Header(0x1122334455667788, 2, 0xAABBCCDD, 7, 9, TYPE_STREAM, Op.SHUTDOWN, 3, 4096, 17)
    raw = h.pack()
    assert len(raw) == HDR_SIZE == 44
    # le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op, le32 x3
    assert raw[:8] == (0x1122334455667788).to_bytes(8, "little")
    assert struct.unpack_from("<IIIHH", raw, 16) == (0xAABBCCDD, 7, 9, 1, 4)
    assert struct.unpack_from("<III", raw, 32) == (3, 4096, 17)
    assert parse_header(raw) == h


def test_short_buffer_is_not_a_header() -> None:
    assert parse_header(b"\0" * 43) is None
    assert parse_header(b"") is None


def test_trailing_bytes_are_ignored_by_the_parser() -> None:
    h = guest_hdr(Op.RW, 5)
    assert parse_header(h.pack() + b"hello") == h


@given(st.binary(max_size=128))
@settings(max_examples=2000)
def test_parsing_never_raises(data: bytes) -> None:
    h = parse_header(data)
    if h is None:
        assert len(data) < HDR_SIZE
        return
    assert h.pack() == data[:HDR_SIZE]
    # Checking a hostile header never raises either, whatever the payload length claimed.
    for payload in (0, h.len, max(h.len - 1, 0)):
        check_tx(h, payload, GUEST)


@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**16 - 1),
)
def test_round_trip(src: int, dst: int, sp: int, dp: int, n: int, typ: int, op: int) -> None:
    h = Header(src, dst, sp, dp, n, typ, op, 0, 1, 2)
    assert parse_header(h.pack()) == h


def test_good_packets_pass() -> None:
    for op in Op:
        assert check_tx(guest_hdr(op), 0, GUEST) is None
    assert check_tx(guest_hdr(Op.RW, 100), 100, GUEST) is None


def test_spoofed_source_is_dropped_silently() -> None:
    r = check_tx(guest_hdr(src_cid=7), 0, GUEST)
    assert r is not None and not r.reset and "source CID 7" in r.reason


def test_wrong_destination_is_answered_with_rst() -> None:
    r = check_tx(guest_hdr(Op.REQUEST, dst_cid=5), 0, GUEST)
    assert r is not None and r.reset and "destination CID 5" in r.reason


def test_rst_is_never_answered() -> None:
    r = check_tx(guest_hdr(Op.RST, dst_cid=9), 0, GUEST)
    assert r is not None and not r.reset


def test_unknown_op_and_type_are_reset() -> None:
    for h in (guest_hdr(op=0), guest_hdr(op=8), guest_hdr(type=2)):
        r = check_tx(h, 0, GUEST)
        assert r is not None and r.reset


def test_len_beyond_the_buffer_is_refused() -> None:
    r = check_tx(guest_hdr(Op.RW, 4096), 4095, GUEST)
    assert r is not None and r.reset and "4096" in r.reason
    r = check_tx(guest_hdr(Op.RW, 1 << 20), 1 << 20, GUEST)
    assert r is not None and "larger" in r.reason
    # Only RW carries a payload; a non-zero len elsewhere is ignored, not trusted.
    assert check_tx(guest_hdr(Op.CREDIT_UPDATE, 99), 0, GUEST) is None


def test_reply_swaps_addresses() -> None:
    to = guest_hdr(Op.REQUEST)
    r = reply_header(to, Op.RST)
    assert (r.src_cid, r.dst_cid, r.src_port, r.dst_port) == (HOST_CID, GUEST, 52, 1234)
    assert (r.op, r.len, r.type) == (Op.RST, 0, TYPE_STREAM)


def test_connect_line() -> None:
    assert parse_connect_line(b"CONNECT 52") == 52
    assert parse_connect_line(b"CONNECT 4294967295\r") == 4294967295
    for bad in (b"CONNECT", b"CONNECT -1", b"CONNECT 4294967296", b"connect 5", b"CONNECT 5 6", b"\xff"):
        assert isinstance(parse_connect_line(bad), str)


@given(st.binary(max_size=80))
def test_connect_line_never_raises(line: bytes) -> None:
    result = parse_connect_line(line)
    assert isinstance(result, str) or 0 <= result <= 0xFFFFFFFF
