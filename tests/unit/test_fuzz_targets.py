"""Every fuzz target (tests/fuzz/targets.py) in the default unit run, briefly and coverage-guided; with
``-m long``, a million inputs each (docs/security.md has the numbers and what they found)."""

from __future__ import annotations

import pytest

from tests.fuzz.engine import Data, fuzz
from tests.fuzz.targets import SEEDS, TARGETS

# The device targets run a reactor per input: about 40 inputs/s coverage-guided, against thousands for a parser
# (the whole file: 44 s on a loaded two-core machine).
SHORT = {name: 100 if name.startswith("mmio_") else 1000 for name in TARGETS}
LONG = 1_000_000


def _check(name: str, runs: int, guided: int) -> None:
    stats = fuzz(name, TARGETS[name], runs, seed=1, seeds=SEEDS[name], guided=guided)
    report = "\n".join(
        f"{c.signature} x{c.count}\ninput {c.data.hex()}\n{c.trace}" for c in stats.crashes.values()
    )
    assert not stats.crashes, f"{stats.line()}\n{report}"
    assert stats.runs == runs


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target_briefly(name: str) -> None:
    _check(name, SHORT[name], guided=SHORT[name])


@pytest.mark.long
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target_a_million_inputs(name: str) -> None:
    _check(name, LONG, guided=20_000)


def test_the_fuzzer_finds_an_escaping_exception() -> None:
    """The engine itself: a target that fails on one byte pattern is caught, with that input."""

    def target(raw: bytes) -> None:
        d = Data(raw)
        if d.u8() == 0x42 and d.u8() == 0x99:
            raise ValueError("found it")

    stats = fuzz("planted", target, 20_000, seed=3, seeds=(b"\x42\x00",))
    line = target.__code__.co_firstlineno + 3
    assert list(stats.crashes) == [f"ValueError at test_fuzz_targets.py:{line}"]
    assert next(iter(stats.crashes.values())).data[:2] == b"\x42\x99"


def test_data_reads_zeroes_past_the_end() -> None:
    d = Data(b"\x01\x02")
    assert (d.u16(), d.u32(), d.left) == (0x0201, 0, 0)
