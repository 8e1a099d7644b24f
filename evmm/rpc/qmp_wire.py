"""QMP's wire (qemu docs/interop/qmp-spec.rst) as a codec for ``RpcServer``, with no I/O.

QMP is JSON objects back to back with no framing: QEMU parses a JSON stream, and the ``qemu.qmp`` client sends
no newline.  So ``JsonSplitter`` finds where each object ends by tracking brackets and strings, and a message
is whatever one object holds; answers and events go out one to a line.  The messages' shapes (greeting,
``execute``, errors, events) are here too; what the commands do is evmm/control/qmp.py's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from evmm.record import record
from evmm.rpc.codec import Fault, Reader

MAX_MESSAGE = 1 << 20
_WS = b" \t\r\n"


# ---- the stream ---------------------------------------------------------------------------------------------


@record(frozen=True)
class JsonError:
    """Input that is not a JSON object; ``fatal`` when no boundary can be trusted any more."""

    message: str
    fatal: bool = False


class JsonSplitter:
    """A byte stream of back-to-back JSON values in, each complete top-level value's bytes out."""

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_size
        self._scan = 0  # bytes of _buf already scanned
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._junk = False  # inside a run of bytes that cannot start a value
        self.broken = False

    def feed(self, data: bytes) -> list[bytes | JsonError]:
        if self.broken:
            return []
        self._buf += data
        out: list[bytes | JsonError] = []
        i = self._scan
        buf = self._buf
        start = 0
        while i < len(buf):
            c = buf[i]
            if self._depth == 0:
                if c in (0x7B, 0x5B):  # { [
                    self._junk = False
                    start = i
                    self._depth = 1
                elif c in _WS:
                    self._junk = False
                    start = i + 1
                else:
                    if not self._junk:
                        out.append(
                            JsonError(f"JSON parse error: unexpected {chr(c)!r}; QMP input is JSON objects")
                        )
                    self._junk = True
                    start = i + 1
            elif self._in_string:
                if self._escape:
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
            elif c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):
                self._depth += 1
            elif c in (0x7D, 0x5D):
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[start : i + 1]))
                    start = i + 1
            i += 1
            if self._depth and i - start > self._max:
                self.broken = True
                self._buf.clear()
                out.append(
                    JsonError(f"QMP message over {self._max} bytes; closing the connection", fatal=True)
                )
                return out
        del self._buf[:start]
        self._scan = len(self._buf)
        return out


def decode_message(raw: bytes) -> dict[str, Any] | JsonError:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return JsonError(f"JSON parse error: {e}")
    if not isinstance(value, dict):
        return JsonError("QMP input must be a JSON object")
    return value


def encode(message: Mapping[str, Any]) -> bytes:
    """One message on its own line, as QEMU sends them; ``ValueError`` for one JSON cannot hold."""
    try:
        text = json.dumps(message, separators=(", ", ": "))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"cannot encode message: {e}") from None
    return text.encode() + b"\r\n"


# ---- messages ---------------------------------------------------------------------------------------------


class QmpError(Exception):
    """A command that failed: one of QEMU's error classes (GenericError, CommandNotFound, ...) and a line."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def qmp_error(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def parse_execute(message: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``{"execute": NAME, "arguments": {...}, "id": ANY}`` to (NAME, arguments), or ``QmpError``."""
    for key in message:
        if key not in ("execute", "arguments", "id"):
            if key == "exec-oob":
                raise QmpError("GenericError", "exec-oob needs the oob capability, which evmm does not offer")
            raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
    name = message.get("execute")
    if not isinstance(name, str):
        raise QmpError("GenericError", "QMP input member 'execute' must be a string")
    args = message.get("arguments", {})
    if not isinstance(args, dict):
        raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
    return name, args


def greeting(version: tuple[int, int, int], package: str) -> dict[str, Any]:
    major, minor, micro = version
    qemu = {"major": major, "minor": minor, "micro": micro}
    return {"QMP": {"version": {"qemu": qemu, "package": package}, "capabilities": []}}


def timestamp(now: float) -> dict[str, int]:
    seconds = int(now)
    return {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}


def event(name: str, data: Mapping[str, Any], now: float) -> dict[str, Any]:
    return {"event": name, "data": dict(data), "timestamp": timestamp(now)}


# ---- the codec ----------------------------------------------------------------------------------------------


class _QmpReader:
    def __init__(self) -> None:
        self._splitter = JsonSplitter(MAX_MESSAGE)

    def feed(self, data: bytes) -> list[dict[str, Any] | Fault]:
        out: list[dict[str, Any] | Fault] = []
        for raw in self._splitter.feed(data):
            message = decode_message(raw) if isinstance(raw, bytes) else raw
            if isinstance(message, JsonError):
                out.append(Fault(qmp_error("GenericError", message.message), message.fatal))
            else:
                out.append(message)
        return out


class QmpCodec:
    """QMP's JSON objects back to back, with QMP's error shape."""

    def reader(self) -> Reader:
        return _QmpReader()

    def encode(self, message: Mapping[str, Any]) -> bytes:
        return encode(message)

    def refusal(self, text: str) -> dict[str, Any]:
        return qmp_error("GenericError", text)

    def unencodable(self, message: Mapping[str, Any], text: str) -> dict[str, Any]:
        reply = qmp_error("GenericError", text)
        if "id" in message:
            reply["id"] = message["id"]
        return reply
