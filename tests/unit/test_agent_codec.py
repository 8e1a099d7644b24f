"""evmm-agent's msgpack codec (evmm/agent/mpack.c) against the host's msgpack, fuzzed with hypothesis.

The codec runs alone in ``codec-test`` (evmm/agent/codec_test.c), built for the host with AddressSanitizer
and UBSan: every value Python packs must come back from C decoded and encoded again byte for byte as
Python's msgpack encodes it, and any byte string must be either decoded (to what Python decodes) or refused
with a reason, never crash the codec.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evmm import agent

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds evmm-agent's codec")


OK = b"\x81\xa2ok"  # {"ok": ...}: what follows is the value as C encoded it


class Codec:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(agent.build(variant="sanitized", program="codec-test"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def raw(self, payload: bytes) -> bytes | str:
        """C's re-encoding of ``payload``'s value (the exact bytes), or its reason for refusing it."""
        answer = self._frame(payload)
        if answer.startswith(OK):
            return answer[len(OK) :]
        return str(msgpack.unpackb(answer, raw=False)["error"])

    def _frame(self, payload: bytes) -> bytes:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(struct.pack(">I", len(payload)) + payload)
        self.proc.stdin.flush()
        header = self.proc.stdout.read(4)
        if len(header) < 4:
            self.proc.wait(5)
            stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise AssertionError(f"codec-test died ({self.proc.returncode}) on {payload[:64]!r}:\n{stderr}")
        (n,) = struct.unpack(">I", header)
        return self.proc.stdout.read(n)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0
        stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
        assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr


@pytest.fixture(scope="module")
def codec() -> Iterator[Codec]:
    c = Codec()
    yield c
    c.close()


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    # the length boundaries of each str and bin header: fix/8/16 bits
    | st.sampled_from([31, 32, 255, 256, 65535, 65536]).flatmap(
        lambda n: st.just("x" * n) | st.just(b"y" * n)
    )
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=17) | st.dictionaries(st.text(max_size=8), inner, max_size=17),
    max_leaves=24,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(values)
def test_every_value_comes_back_encoded_as_python_encodes_it(codec: Codec, value: Any) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    assert codec.raw(packed) == packed


def _python_decodes(payload: bytes) -> bool:
    try:
        msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_no_ext)
    except Exception:
        return False
    return True


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("extension")


@SETTINGS
@given(st.binary(min_size=1, max_size=200))
def test_garbage_is_decoded_as_python_decodes_it_or_refused(codec: Codec, payload: bytes) -> None:
    got = codec.raw(payload)
    if _python_decodes(payload):
        # The one difference allowed: C takes a non-UTF-8 str as bytes, which Python refuses; here Python
        # took it, so C must agree on the value.
        assert got == msgpack.packb(
            msgpack.unpackb(payload, raw=False, strict_map_key=False), use_bin_type=True
        )
    elif isinstance(got, bytes):
        # C accepted what Python refused: only strings that are not UTF-8 may be why.
        assert _python_decodes_raw(payload), f"C accepted {payload!r}"


def _python_decodes_raw(payload: bytes) -> bool:
    try:
        msgpack.unpackb(payload, raw=True, strict_map_key=False, ext_hook=_no_ext)
    except Exception:
        return False
    return True


@SETTINGS
@given(values, st.data())
def test_every_truncation_is_refused(codec: Codec, value: Any, data: st.DataObject) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    if len(packed) < 2:
        return
    cut = data.draw(st.integers(min_value=1, max_value=len(packed) - 1))
    assert isinstance(codec.raw(packed[:cut]), str)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xdd\xff\xff\xff\xff", "longer than its frame"),  # array32 of 4 billion items in 5 bytes
        (b"\xdf\xff\xff\xff\xff\x00", "longer than its frame"),  # map32
        (b"\xdb\xff\xff\xff\xffab", "truncated"),  # str32 longer than the frame
        (b"\x91" * 17 + b"\xc0", "nested too deeply"),
        (b"\xc1", "0xc1"),
        (b"\xd4\x01\x00", "extension"),
        (b"\xc0\xc0", "more than one"),
    ],
)
def test_hostile_encodings_are_refused_with_a_reason(codec: Codec, payload: bytes, reason: str) -> None:
    got = codec.raw(payload)
    assert isinstance(got, str) and reason in got


def test_sixteen_levels_of_nesting_are_accepted(codec: Codec) -> None:
    payload = b"\x91" * 15 + b"\xc0"
    assert codec.raw(payload) == payload
