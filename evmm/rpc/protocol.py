"""evmm's RPC wire format, shared by the control channel and the guest agent, with no I/O: frames, an
incremental decoder, and message validation.

A frame is a 4-byte big-endian payload length followed by that many bytes holding ONE msgpack map.  Three
kinds of map travel (docs/control-protocol.md has the whole story):

- request (client -> VMM): ``{"id": int|str, "method": str, "params": map}`` (``params`` may be left out);
- response (VMM -> client): ``{"id": ..., "result": any}`` or ``{"id": ..., "error": {"code": int,
  "message": str}}``, where ``id`` is nil when the request was too broken to carry one;
- event (VMM -> client): ``{"event": str, "data": map, "timestamp": float}`` (seconds since the epoch).

Errors come in two weights.  A frame whose payload is not one msgpack map, or a map that is not a valid request,
costs the client one error response: the frame boundary is intact, so the next frame is read as usual.  A bad
length (zero, or over ``MAX_FRAME``) leaves no trustworthy boundary, so it is ``fatal``: the decoder stops, and
the server answers once and hangs up.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Any

from evmm.record import record

MAX_FRAME = 1 << 20  # payload bytes; console chunks and query-vm answers are far below this
MAX_METHOD = 64
HEADER = struct.Struct(">I")


class ErrorCode(enum.IntEnum):
    """The ``error.code`` values; the JSON-RPC 2.0 numbers where JSON-RPC has the same case."""

    PARSE_ERROR = -32700  # the frame's payload is not one msgpack value
    INVALID_REQUEST = -32600  # not a map with a valid id, method and params
    METHOD_NOT_FOUND = -32601  # no such method (query-commands lists them)
    INVALID_PARAMS = -32602  # a parameter is unknown, missing, of the wrong type or out of range
    INTERNAL_ERROR = -32603  # a bug in evmm; the VMM keeps running
    FRAME_TOO_LARGE = -32000  # a length prefix of 0 or over MAX_FRAME; the connection is then closed
    VM_STATE = -32001  # the method does not apply in the VM's current state (e.g. pause a stopped VM)
    FAILED = -32002  # the machine refused, and the message says why (no free slot, a missing image, ...)
    TOO_MANY_CLIENTS = -32003  # the server's client limit; the connection is then closed


class ProtocolError(Exception):
    """A broken frame or message: ``code`` and a one-line ``message``; ``id`` when the request had one."""

    def __init__(self, code: ErrorCode, message: str, *, id: int | str | None = None, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.fatal = fatal


@record(frozen=True)
class Request:
    id: int | str
    method: str
    params: dict[str, Any]


@record(frozen=True)
class ErrorInfo:
    code: int
    message: str


@record(frozen=True)
class Response:
    id: int | str | None
    result: Any = None
    error: ErrorInfo | None = None


@record(frozen=True)
class Event:
    event: str
    data: dict[str, Any]
    timestamp: float


# ---- framing ---------------------------------------------------------------------------------------------


def _no_ext(code: int, data: bytes) -> Any:
    # Extension types (msgpack's timestamps among them) carry nothing any method takes.
    raise ValueError(f"msgpack extension type {code} is not accepted")


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """One frame; raises ``ValueError`` for a map that does not pack or packs larger than ``MAX_FRAME``."""
    import msgpack  # type: ignore[import-untyped]  # here: evmm run without a socket never loads it

    try:
        payload: bytes = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"cannot encode message: {e}") from None
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes is over the {MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """A frame's payload to a map, or ``ProtocolError(PARSE_ERROR)``."""
    import msgpack

    try:
        value = msgpack.unpackb(payload, raw=False, ext_hook=_no_ext, strict_map_key=True)
    except msgpack.ExtraData:
        raise ProtocolError(ErrorCode.PARSE_ERROR, "frame holds more than one msgpack value") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # UnicodeDecodeError, StackError (nesting too deep) and FormatError are ValueErrors.
        raise ProtocolError(ErrorCode.PARSE_ERROR, f"frame is not valid msgpack: {e}") from None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"frame holds a {_kind(value)}, not a map")
    return value


class Decoder:
    """Bytes in, messages out: ``feed`` returns, in order, each complete frame's map or ``ProtocolError``.

    After a fatal error the decoder is ``broken`` and ignores further input.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.broken = False

    def feed(self, data: bytes) -> list[dict[str, Any] | ProtocolError]:
        if self.broken:
            return []
        self._buf += data
        out: list[dict[str, Any] | ProtocolError] = []
        pos = 0
        while len(self._buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf, pos)
            if length == 0 or length > self._max:
                self.broken = True
                self._buf.clear()
                what = "an empty frame" if length == 0 else f"a frame of {length} bytes"
                out.append(
                    ProtocolError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"{what}: frames are 1 to {self._max} bytes; closing the connection",
                        fatal=True,
                    )
                )
                return out
            end = pos + HEADER.size + length
            if end > len(self._buf):
                break
            payload = bytes(self._buf[pos + HEADER.size : end])
            pos = end
            try:
                out.append(decode_payload(payload))
            except ProtocolError as e:
                out.append(e)
        del self._buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buf)


# ---- validation -------------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    return {
        dict: "map",
        list: "array",
        str: "string",
        bytes: "binary",
        bool: "boolean",
        int: "integer",
        float: "float",
        type(None): "nil",
    }.get(type(value), type(value).__name__)


def _valid_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 64) or (
        isinstance(value, str) and len(value) <= 256
    )


def parse_request(message: Mapping[str, Any]) -> Request:
    """A decoded map to a ``Request``, or ``ProtocolError(INVALID_REQUEST)`` carrying the id when it had one."""
    raw_id = message.get("id")
    id = raw_id if _valid_id(raw_id) else None

    def bad(text: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_REQUEST, text, id=id)

    extra = sorted(str(k) for k in message if k not in ("id", "method", "params"))
    if extra:
        raise bad(f"unknown request field {extra[0]!r} (a request has id, method and params)")
    if "id" not in message:
        raise bad("request has no id")
    if id is None:
        raise bad(f"request id is a {_kind(raw_id)}; use an integer or a string of up to 256 characters")
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise bad("request has no method" if method is None else f"method is a {_kind(method)}, not a string")
    if len(method) > MAX_METHOD or not method.isprintable():
        raise bad(f"method name {method[:20]!r}... is over {MAX_METHOD} characters or not printable")
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise bad(f"params is a {_kind(params)}, not a map")
    return Request(id=id, method=method, params=params)


def parse_server_message(message: Mapping[str, Any]) -> Response | Event:
    """What a client receives: a response or an event; ``ProtocolError`` for anything else."""
    if "event" in message:
        name, data, ts = message.get("event"), message.get("data", {}), message.get("timestamp")
        if not isinstance(name, str) or not name:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"event name is a {_kind(name)}, not a string")
        if not isinstance(data, dict):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"event {name!r} data is a {_kind(data)}")
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"event {name!r} has no numeric timestamp")
        return Event(name, data, float(ts))
    if "id" not in message:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "message is neither a response (id) nor an event")
    raw_id = message["id"]
    if raw_id is not None and not _valid_id(raw_id):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"response id is a {_kind(raw_id)}")
    if "error" in message:
        err = message["error"]
        if not (
            isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("message"), str)
        ):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "response error is not {code: int, message: str}")
        return Response(raw_id, error=ErrorInfo(err["code"], err["message"]))
    if "result" not in message:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "response has neither result nor error")
    return Response(raw_id, result=message["result"])


# ---- building messages ---------------------------------------------------------------------------------


def request(id: int | str, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"id": id, "method": method, "params": dict(params or {})}


def result(id: int | str | None, value: Any) -> dict[str, Any]:
    return {"id": id, "result": value}


def error(id: int | str | None, code: int, message: str) -> dict[str, Any]:
    return {"id": id, "error": {"code": int(code), "message": message}}


def event(name: str, data: Mapping[str, Any], timestamp: float) -> dict[str, Any]:
    return {"event": name, "data": dict(data), "timestamp": timestamp}
