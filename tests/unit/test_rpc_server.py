"""The RPC server core (evmm/rpc/server.py) with its codecs, apart from the control channel and QMP: a third
protocol on the same frames takes a session class and a handler, nothing copied.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.rpc import server as rpc_server
from evmm.rpc.codec import Fault, MsgpackCodec
from evmm.rpc.connection import Connection, RpcError
from evmm.rpc.protocol import ErrorCode, Event, ProtocolError, encode_frame, event, parse_request, result
from evmm.rpc.qmp_wire import QmpCodec
from evmm.rpc.server import RpcServer, Session


class EchoSession(Session):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls = 0


class Echo:
    """A protocol of its own on msgpack frames: ``echo`` answers its params; ``bad`` answers what cannot pack."""

    def __init__(self, path: Path) -> None:
        self.rpc = RpcServer(
            path, "--echo-sock", MsgpackCodec(), EchoSession, self.handle, kind="echo client"
        )

    async def handle(self, session: EchoSession, message: dict[str, Any]) -> None:
        request = parse_request(message)
        session.calls += 1
        value: Any = {"params": request.params, "calls": session.calls, "peer": session.name}
        if request.method == "bad":
            value = {1, 2}  # a set: msgpack has no such type
        session.send(result(request.id, value))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="evmm-rpc-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
async def echo(sockdir: Path) -> AsyncIterator[Echo]:
    server = Echo(sockdir / "echo.sock")
    await server.rpc.start()
    yield server
    await server.rpc.close()
    assert not (sockdir / "echo.sock").exists()


async def connect(path: Path, events: list[Event] | None = None) -> Connection:
    reader, writer = await asyncio.open_unix_connection(str(path))
    return Connection(
        reader, writer, peer="the echo server", on_event=(events if events is not None else []).append
    )


async def test_a_third_protocol_is_a_session_class_and_a_handler(echo: Echo) -> None:
    a, b = await connect(echo.rpc.path), await connect(echo.rpc.path)
    assert await a.call("echo", {"x": 1}) == {
        "params": {"x": 1},
        "calls": 1,
        "peer": f"echo client 1 (pid {os.getpid()})",
    }
    assert (await a.call("echo"))["calls"] == 2  # per-client state lives in the session
    assert (await b.call("echo"))["calls"] == 1
    await a.close()
    await b.close()


async def test_an_answer_that_cannot_be_encoded_is_still_answered(echo: Echo) -> None:
    c = await connect(echo.rpc.path)
    with pytest.raises(RpcError, match="cannot encode message") as info:
        await asyncio.wait_for(c.call("bad"), 5)
    assert info.value.code == ErrorCode.INTERNAL_ERROR
    assert (await c.call("echo"))["calls"] == 2  # and the connection goes on
    await c.close()


async def test_broadcast_reaches_only_the_sessions_named(echo: Echo) -> None:
    got_a: list[Event] = []
    got_b: list[Event] = []
    a, b = await connect(echo.rpc.path, got_a), await connect(echo.rpc.path, got_b)
    await a.call("echo")
    await b.call("echo")
    first = [s for s in echo.rpc.sessions.values() if s.number == 1]
    echo.rpc.broadcast(event("tick", {"n": 1}, 1.0), first)
    echo.rpc.broadcast(event("unpackable", {"n": {1}}, 1.0), echo.rpc.sessions.values())  # dropped, logged
    await a.call("echo")  # answers come after anything sent before them
    await b.call("echo")
    assert [(e.event, e.data) for e in got_a] == [("tick", {"n": 1})]
    assert got_b == []
    await a.close()
    await b.close()


async def test_the_client_limit_turns_away_in_the_codecs_words(
    echo: Echo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rpc_server, "MAX_CLIENTS", 1)
    a = await connect(echo.rpc.path)
    await a.call("echo")
    reader, writer = await asyncio.open_unix_connection(str(echo.rpc.path))
    data = await asyncio.wait_for(reader.read(), 5)  # the refusal, then EOF
    assert data == encode_frame(
        {"id": None, "error": {"code": ErrorCode.TOO_MANY_CLIENTS, "message": "over 1 echo clients"}}
    )
    writer.close()
    await a.close()


def test_codecs_turn_bad_input_into_answers_in_their_own_shape() -> None:
    frames = MsgpackCodec().reader()
    (fault,) = frames.feed(b"\x00\x00\x00\x01\xc1")  # a frame whose payload is not msgpack
    assert isinstance(fault, Fault) and not fault.fatal
    assert fault.reply["error"]["code"] == ErrorCode.PARSE_ERROR
    (fault,) = frames.feed(b"\xff\xff\xff\xff")  # a length over the limit: no boundary left to trust
    assert (
        isinstance(fault, Fault) and fault.fatal and fault.reply["error"]["code"] == ErrorCode.FRAME_TOO_LARGE
    )
    json = QmpCodec().reader()
    assert json.feed(b'{"execute": "stop"} x') == [
        {"execute": "stop"},
        Fault(
            {
                "error": {
                    "class": "GenericError",
                    "desc": "JSON parse error: unexpected 'x'; QMP input is JSON objects",
                }
            }
        ),
    ]


def test_codecs_answer_an_unencodable_message_with_its_id() -> None:
    assert MsgpackCodec().unencodable({"id": 7, "result": {1}}, "no sets") == {
        "id": 7,
        "error": {"code": ErrorCode.INTERNAL_ERROR, "message": "no sets"},
    }
    assert QmpCodec().unencodable({"id": "a", "return": {1}}, "no sets") == {
        "error": {"class": "GenericError", "desc": "no sets"},
        "id": "a",
    }
    with pytest.raises(ValueError, match="cannot encode message"):
        QmpCodec().encode({"return": {1}})
    with pytest.raises(ValueError, match="cannot encode message"):
        MsgpackCodec().encode({"result": {1}})


def test_a_protocol_error_is_not_a_fault_of_the_stream() -> None:
    # parse_request's errors are the handler's to answer: the codec hands over every well-framed map.
    (message,) = MsgpackCodec().reader().feed(encode_frame({"id": 3, "method": 5}))
    assert message == {"id": 3, "method": 5}
    with pytest.raises(ProtocolError):
        parse_request(message)
