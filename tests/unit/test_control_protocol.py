"""The control protocol's framing and validation (evmm/rpc/protocol.py): exact bytes, every error, fuzzing."""

from __future__ import annotations

import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.rpc.protocol import (
    MAX_FRAME,
    Decoder,
    ErrorCode,
    ErrorInfo,
    Event,
    ProtocolError,
    Request,
    Response,
    decode_payload,
    encode_frame,
    error,
    event,
    parse_request,
    parse_server_message,
    request,
    result,
)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def test_a_frame_is_a_big_endian_length_then_msgpack() -> None:
    data = encode_frame({"id": 1, "method": "pause", "params": {}})
    payload = msgpack.packb({"id": 1, "method": "pause", "params": {}})
    assert data == struct.pack(">I", len(payload)) + payload


def test_decoder_takes_bytes_one_at_a_time_and_several_frames_at_once() -> None:
    stream = encode_frame(request(1, "pause")) + encode_frame(request("x", "resume", {"a": b"\x00"}))
    d = Decoder()
    out: list[Any] = []
    for b in stream:
        out += d.feed(bytes([b]))
    assert out == [request(1, "pause"), request("x", "resume", {"a": b"\x00"})]
    assert Decoder().feed(stream) == out
    assert d.pending == 0


def test_a_truncated_frame_waits_for_the_rest() -> None:
    data = encode_frame(request(7, "query-vm"))
    d = Decoder()
    assert d.feed(data[:-1]) == []
    assert d.pending == len(data) - 1
    assert d.feed(data[-1:]) == [request(7, "query-vm")]


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_bad_length_is_fatal_and_the_decoder_stops(length: int) -> None:
    d = Decoder()
    good = encode_frame(request(1, "pause"))
    out = d.feed(good + struct.pack(">I", length) + b"xyz")
    assert out[0] == request(1, "pause")
    err = out[1]
    assert isinstance(err, ProtocolError) and err.fatal and err.code == ErrorCode.FRAME_TOO_LARGE
    assert d.broken
    assert d.feed(good) == []


def test_a_frame_of_exactly_max_size_is_taken() -> None:
    payload = msgpack.packb({"k": "x" * 59})  # fixmap, fixstr key, str8 header: 64 bytes
    assert len(payload) == 64
    assert Decoder(max_frame=64).feed(frame(payload)) == [{"k": "x" * 59}]
    (err,) = Decoder(max_frame=63).feed(frame(payload))
    assert isinstance(err, ProtocolError) and err.fatal


@pytest.mark.parametrize(
    ("payload", "code", "text"),
    [
        (b"\xc1", ErrorCode.PARSE_ERROR, "not valid msgpack"),  # 0xc1 is never used
        (b"\x81\xa1", ErrorCode.PARSE_ERROR, "not valid msgpack"),  # map cut short
        (msgpack.packb(1) + msgpack.packb(2), ErrorCode.PARSE_ERROR, "more than one"),
        (msgpack.packb([1, 2]), ErrorCode.INVALID_REQUEST, "array, not a map"),
        (msgpack.packb("pause"), ErrorCode.INVALID_REQUEST, "string, not a map"),
        (msgpack.packb({1: 2}), ErrorCode.PARSE_ERROR, "not valid msgpack"),  # keys must be strings
        (msgpack.packb({"a": msgpack.ExtType(5, b"x")}), ErrorCode.PARSE_ERROR, "extension type 5"),
        (b"\xa2\xff\xfe", ErrorCode.PARSE_ERROR, "not valid msgpack"),  # a str that is not UTF-8
        (b"\x91" * 5000 + b"\xc0", ErrorCode.PARSE_ERROR, "not valid msgpack"),  # nested too deep
    ],
)
def test_a_bad_payload_costs_one_error_and_the_next_frame_is_read(
    payload: bytes, code: int, text: str
) -> None:
    d = Decoder()
    out = d.feed(frame(payload) + encode_frame(request(2, "resume")))
    assert len(out) == 2
    err = out[0]
    assert isinstance(err, ProtocolError) and not err.fatal
    assert err.code == code and text in err.message, err.message
    assert out[1] == request(2, "resume")


def test_encode_refuses_what_does_not_fit_or_does_not_pack() -> None:
    with pytest.raises(ValueError, match="frame limit"):
        encode_frame({"data": b"x" * MAX_FRAME})
    with pytest.raises(ValueError, match="cannot encode"):
        encode_frame({"x": object()})


# ---- requests ------------------------------------------------------------------------------------------------


def test_a_valid_request() -> None:
    assert parse_request({"id": 3, "method": "pause", "params": {"a": 1}}) == Request(3, "pause", {"a": 1})
    assert parse_request({"id": "abc", "method": "quit"}) == Request("abc", "quit", {})
    assert parse_request({"id": 0, "method": "quit", "params": None}) == Request(0, "quit", {})


@pytest.mark.parametrize(
    ("message", "text", "id"),
    [
        ({"method": "pause"}, "no id", None),
        ({"id": True, "method": "pause"}, "id is a boolean", None),
        ({"id": 1.5, "method": "pause"}, "id is a float", None),
        ({"id": [1], "method": "pause"}, "id is a array", None),
        ({"id": "x" * 300, "method": "pause"}, "id is a string", None),
        ({"id": 1 << 70, "method": "pause"}, "id is a integer", None),
        ({"id": 4}, "no method", 4),
        ({"id": 4, "method": 5}, "method is a integer", 4),
        ({"id": 4, "method": ""}, "method is a string", 4),
        ({"id": 4, "method": "x" * 65}, "over 64 characters", 4),
        ({"id": 4, "method": "a\nb"}, "not printable", 4),
        ({"id": 4, "method": "pause", "params": [1]}, "params is a array", 4),
        ({"id": "q", "method": "pause", "extra": 1}, "unknown request field 'extra'", "q"),
    ],
)
def test_invalid_requests_name_the_fault_and_keep_the_id(message: dict[str, Any], text: str, id: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(message)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert text in info.value.message
    assert info.value.id == id
    assert "\n" not in info.value.message


# ---- what a client receives -------------------------------------------------------------------------------


def test_server_messages_parse() -> None:
    assert parse_server_message(result(1, {"state": "paused"})) == Response(1, {"state": "paused"})
    assert parse_server_message(error(None, ErrorCode.PARSE_ERROR, "bad")) == Response(
        None, error=ErrorInfo(-32700, "bad")
    )
    assert parse_server_message(event("shutdown", {"code": 0}, 12.5)) == Event("shutdown", {"code": 0}, 12.5)


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"id": 1},
        {"id": 1, "error": "x"},
        {"id": 1, "error": {"code": "x", "message": "m"}},
        {"id": 1.5, "result": 1},
        {"event": 3, "data": {}, "timestamp": 1.0},
        {"event": "x", "data": [], "timestamp": 1.0},
        {"event": "x", "data": {}},
        {"event": "x", "data": {}, "timestamp": True},
    ],
)
def test_bad_server_messages_are_protocol_errors(message: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_server_message(message)


# ---- fuzzing ---------------------------------------------------------------------------------------------------


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[last:p])
        last = p
    return chunks


def _normal(items: list[Any]) -> list[Any]:
    return [(i.code, i.message, i.fatal) if isinstance(i, ProtocolError) else i for i in items]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0, max_value=5000), max_size=8))
def test_garbage_never_crashes_and_chunking_does_not_matter(data: bytes, cuts: list[int]) -> None:
    whole = Decoder(max_frame=1024).feed(data)
    d = Decoder(max_frame=1024)
    pieces: list[Any] = []
    for chunk in _split(data, cuts):
        pieces += d.feed(chunk)
    assert _normal(pieces) == _normal(whole)
    for item in whole:
        if isinstance(item, ProtocolError):
            assert item.message and "\n" not in item.message
        else:
            assert isinstance(item, dict)
            try:
                parse_request(item)
            except ProtocolError as e:
                assert e.code == ErrorCode.INVALID_REQUEST


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=10), _values, max_size=4), max_size=4),
    st.lists(st.integers(0, 4000), max_size=8),
)
def test_every_map_round_trips_through_any_split(messages: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    d = Decoder()
    out: list[Any] = []
    for chunk in _split(stream, cuts):
        out += d.feed(chunk)
    assert len(out) == len(messages)
    for got, want in zip(out, messages, strict=True):
        assert msgpack.packb(got) == msgpack.packb(want)  # NaN-safe equality
        try:
            parse_request(got)
        except ProtocolError as e:
            assert e.code == ErrorCode.INVALID_REQUEST and "\n" not in e.message


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_any_payload_in_a_well_formed_frame_is_one_answer(payload: bytes) -> None:
    out = Decoder().feed(frame(payload))
    assert len(out) == 1
    assert isinstance(out[0], dict | ProtocolError)
    if isinstance(out[0], ProtocolError):
        assert not out[0].fatal
    else:
        assert decode_payload(payload) == out[0]
