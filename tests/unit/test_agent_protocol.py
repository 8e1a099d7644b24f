"""evmm-agent against hostile input: the real agent (built for the host with ASan and UBSan) on a Unix socket.

Whatever arrives, the agent answers each frame (an error when it is not a valid request) and keeps serving;
a frame whose length cannot be trusted is answered once and the connection closed.  Every method is fuzzed
with parameters of every msgpack type (paths confined to a scratch directory, programs to ones that do not
exist), and the agent must answer each and still answer a ping.  ``HostAgent.stop`` fails the test if a
sanitizer reported anything.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evmm.rpc.protocol import MAX_FRAME, ErrorCode
from tests.fakes.agent import HostAgent, RawClient

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds evmm-agent")

METHODS = {
    "ping": (),
    "version": (),
    "exec": ("argv", "env", "cwd", "uid", "gid", "groups", "umask", "rlimits", "tty", "rows", "cols", "stdin")
    + ("window", "detach", "container", "join"),
    "credit": ("pid", "stream", "bytes"),
    "stdin": ("pid", "data"),
    "stdin-close": ("pid",),
    "signal": ("pid", "signal", "group"),
    "resize": ("pid", "rows", "cols"),
    "wait": ("pid",),
    "attach": ("pid", "window"),
    "processes": (),
    "file-put": ("path", "mode", "uid", "gid"),
    "file-write": ("handle", "data"),
    "file-commit": ("handle", "size", "crc32"),
    "file-get": ("path",),
    "file-read": ("handle", "length"),
    "file-close": ("handle",),
    "stat": ("path", "follow"),
    "list": ("path", "start"),
    "mkdir": ("path", "mode", "parents"),
    "remove": ("path", "recursive"),
    "set-time": ("seconds", "nanoseconds"),
    "add-entropy": ("data", "bits"),
    "sync": (),
    "poweroff": ("reboot",),
}


@pytest.fixture(scope="module")
def host_agent() -> Iterator[HostAgent]:
    with HostAgent() as a:
        yield a


@pytest.fixture
def client(host_agent: HostAgent) -> Iterator[RawClient]:
    c = RawClient(host_agent.path)
    yield c
    c.close()


def alive(path: Path) -> None:
    c = RawClient(path)
    try:
        assert c.call("ping") == {"id": 1, "result": {}}
    finally:
        c.close()


def test_version_names_every_method(client: RawClient) -> None:
    answer = client.call("version")["result"]
    assert answer["protocol"] == 1 and answer["agent"]
    assert answer["methods"] == list(METHODS)


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        ({"method": "ping"}, ErrorCode.INVALID_REQUEST, "no id"),
        ({"id": 1.5, "method": "ping"}, ErrorCode.INVALID_REQUEST, "id must be"),
        ({"id": 1, "method": "ping", "extra": 1}, ErrorCode.INVALID_REQUEST, "unknown request field"),
        ({"id": 1}, ErrorCode.INVALID_REQUEST, "no method"),
        ({"id": 1, "method": "x" * 65}, ErrorCode.INVALID_REQUEST, "no method"),
        ({"id": 1, "method": "ping", "params": [1]}, ErrorCode.INVALID_REQUEST, "params is not a map"),
        ({"id": 1, "method": "nope"}, ErrorCode.METHOD_NOT_FOUND, "no method 'nope'"),
        (
            {"id": 1, "method": "exec", "params": {"argv": ["x"], "bogus": 1}},
            ErrorCode.INVALID_PARAMS,
            "'bogus'",
        ),
        ({"id": 1, "method": "exec", "params": {"argv": "ls"}}, ErrorCode.INVALID_PARAMS, "argv must be"),
        ({"id": 1, "method": "exec", "params": {"argv": []}}, ErrorCode.INVALID_PARAMS, "argv must name"),
        ({"id": 1, "method": "exec", "params": {"argv": ["a\x00b"]}}, ErrorCode.INVALID_PARAMS, "NUL"),
        (
            {"id": 1, "method": "exec", "params": {"argv": ["x"], "env": ["NOEQUALS"]}},
            ErrorCode.INVALID_PARAMS,
            "NAME=VALUE",
        ),
        (
            {"id": 1, "method": "exec", "params": {"argv": ["x"], "umask": 0o1000}},
            ErrorCode.INVALID_PARAMS,
            "umask",
        ),
        (
            {"id": 1, "method": "exec", "params": {"argv": ["x"], "join": 1, "container": {"rootfs": "/"}}},
            ErrorCode.INVALID_PARAMS,
            "exclude",
        ),
        (
            {
                "id": 1,
                "method": "exec",
                "params": {
                    "argv": ["x"],
                    "container": {"rootfs": "/", "mounts": [{"target": "/a/../b", "type": "tmpfs"}]},
                },
            },
            ErrorCode.INVALID_PARAMS,
            "'..'",
        ),
        (
            {
                "id": 1,
                "method": "exec",
                "params": {"argv": ["x"], "container": {"rootfs": "/", "namespaces": ["user"]}},
            },
            ErrorCode.INVALID_PARAMS,
            "supported",
        ),
        (
            {"id": 1, "method": "signal", "params": {"pid": 1, "signal": "NOPE"}},
            ErrorCode.FAILED,
            "no process 1",
        ),
        ({"id": 1, "method": "set-time", "params": {"seconds": 0}}, ErrorCode.FAILED, "refused"),
        ({"id": 1, "method": "poweroff"}, ErrorCode.FAILED, "refused"),
    ],
)
def test_bad_requests_get_one_line_errors(
    client: RawClient, message: dict[str, Any], code: int, words: str
) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    client.send_raw(struct.pack(">I", len(payload)) + payload)
    answer = client.recv()
    assert answer is not None and "error" in answer, answer
    assert answer["error"]["code"] == code and words in answer["error"]["message"]
    assert "\n" not in answer["error"]["message"]
    assert client.call("ping")["result"] == {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
def test_any_payload_is_answered_and_the_agent_serves_on(client: RawClient, payload: bytes) -> None:
    client.send_raw(struct.pack(">I", len(payload)) + payload)
    client.send(7, "ping")
    answers = [client.recv(), client.recv()]
    assert answers[1] == {"id": 7, "result": {}} or answers[0] == {"id": 7, "result": {}}, answers


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_bad_length_is_answered_once_then_the_connection_closes(host_agent: HostAgent, length: int) -> None:
    c = RawClient(host_agent.path)
    c.send_raw(struct.pack(">I", length) + b"\x80" * 8)
    answer = c.recv()
    assert answer is not None and answer["id"] is None
    assert answer["error"]["code"] == ErrorCode.FRAME_TOO_LARGE
    assert c.recv() is None
    c.close()
    alive(host_agent.path)


def test_a_frame_of_the_largest_size_is_served(client: RawClient) -> None:
    data = b"x" * (MAX_FRAME - 64)
    answer = client.call("add-entropy", {"data": data})
    assert answer["error"]["code"] == ErrorCode.INVALID_PARAMS  # 4096 bytes at most: refused, not choked on


def test_a_frame_trickled_in_one_byte_at_a_time_is_served(client: RawClient) -> None:
    payload = msgpack.packb({"id": 3, "method": "ping"})
    for b in struct.pack(">I", len(payload)) + payload:
        client.send_raw(bytes([b]))
    assert client.answer(3) == {"id": 3, "result": {}}


def test_the_sixty_fifth_client_is_turned_away(host_agent: HostAgent) -> None:
    clients = [RawClient(host_agent.path) for _ in range(64)]
    try:
        for c in clients:
            assert c.call("ping")["result"] == {}
        extra = RawClient(host_agent.path)
        answer = extra.recv()
        assert answer is not None and answer["error"]["code"] == -32003
        assert extra.recv() is None
        extra.close()
    finally:
        for c in clients:
            c.close()
    alive(host_agent.path)


# ---- every method, fuzzed ---------------------------------------------------------------------------------

any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
# Keys whose string values would reach the host's file system or run a program are confined.
PATH_KEYS = {"path", "cwd"}


def _confine(method: str, key: str, value: Any, scratch: Path) -> Any:
    if key in PATH_KEYS and isinstance(value, str | bytes):
        return f"{scratch}/{value if isinstance(value, str) else value.hex()}".replace("..", "__")
    if key == "argv" and isinstance(value, list):
        return ["/nonexistent/evmm-fuzz", *value]
    if key == "container" and isinstance(value, dict):
        return {**value, "rootfs": f"{scratch}/root", "mounts": []}
    if key == "join":
        return None
    if method == "remove" and key == "recursive":
        return False
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(METHODS)), st.data())
def test_every_method_with_fuzzed_parameters_is_answered(
    host_agent: HostAgent, tmp_path: Path, method: str, data: st.DataObject
) -> None:
    keys = list(METHODS[method]) + ["unknown"]
    chosen = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    params = {k: _confine(method, k, data.draw(any_value), tmp_path) for k in chosen}
    params = {k: v for k, v in params.items() if v is not None or k != "join"}
    c = RawClient(host_agent.path)
    try:
        c.send(1, method, params)
        answer = c.answer(1)
        assert ("result" in answer) != ("error" in answer), answer
        if "error" in answer:
            assert "\n" not in answer["error"]["message"]
        assert c.call("ping")["result"] == {}
    finally:
        c.close()  # and the agent kills whatever the client started
