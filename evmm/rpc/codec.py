"""What ``RpcServer`` needs of a wire format, and evmm's own: msgpack frames.

A codec is sans-I/O.  Each connection gets its own ``Reader`` (a stream may stop mid-message), which turns bytes
into messages, and the codec turns messages into bytes.  Input that is not a message becomes a ``Fault``: the
answer to send, already in the protocol's own error shape, and whether the stream can still be trusted.  The
server core never looks inside a message, so a protocol (the control channel, QMP, a proxy to the guest
agent) is a codec plus a handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from evmm.record import record
from evmm.rpc.protocol import Decoder, ErrorCode, ProtocolError, encode_frame, error


@record(frozen=True)
class Fault:
    """Input that is not a message: ``reply`` goes back; after a ``fatal`` one the connection is closed."""

    reply: dict[str, Any]
    fatal: bool = False


class Reader(Protocol):
    def feed(self, data: bytes) -> list[dict[str, Any] | Fault]:
        """Each message completed by ``data``, in order, or a ``Fault``; bytes of an unfinished one are kept."""
        ...


class Codec(Protocol):
    def reader(self) -> Reader:
        """A reader for one new connection."""
        ...

    def encode(self, message: Mapping[str, Any]) -> bytes:
        """The bytes of ``message``; ``ValueError`` (one line) for one that cannot be encoded."""
        ...

    def refusal(self, text: str) -> dict[str, Any]:
        """The message for a client turned away before it sent anything (the client limit)."""
        ...

    def unencodable(self, message: Mapping[str, Any], text: str) -> dict[str, Any]:
        """What to send instead of an answer that cannot be encoded, so its request is still answered."""
        ...


class _FrameReader:
    def __init__(self) -> None:
        self._decoder = Decoder()

    def feed(self, data: bytes) -> list[dict[str, Any] | Fault]:
        return [
            Fault(error(item.id, item.code, item.message), item.fatal)
            if isinstance(item, ProtocolError)
            else item
            for item in self._decoder.feed(data)
        ]


class MsgpackCodec:
    """``evmm.rpc.protocol``'s length-prefixed msgpack frames (docs/control-protocol.md)."""

    def reader(self) -> Reader:
        return _FrameReader()

    def encode(self, message: Mapping[str, Any]) -> bytes:
        return encode_frame(message)

    def refusal(self, text: str) -> dict[str, Any]:
        return error(None, ErrorCode.TOO_MANY_CLIENTS, text)

    def unencodable(self, message: Mapping[str, Any], text: str) -> dict[str, Any]:
        return error(message.get("id"), ErrorCode.INTERNAL_ERROR, text)
