"""A small coverage-guided mutation fuzzer for evmm's guest- and client-facing parsers (libFuzzer's loop, in
Python): keep a corpus, mutate an input from it, run the target, keep the input when it reached a line of
evmm never reached before, record any exception that escapes as a crash.

Coverage costs: line tracing (``sys.settrace``, evmm's own files only) makes a run several times slower, so
it is on for the first ``guided`` inputs, which build the corpus, and off for the bulk of a long run, which
mutates that corpus at full speed.  Every input is derived from ``seed``: a crash is reproduced by its bytes
(printed in hex) or by rerunning the same seed.
"""

from __future__ import annotations

import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

Target = Callable[[bytes], None]

EVMM_DIR = str(Path(__file__).resolve().parents[2] / "evmm")
MAX_LEN = 4096
INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFF)
INTERESTING_16 = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 256, 512, 4096)
INTERESTING_32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x1000, 0x100000, 0xFFFFF000)


class Data:
    """Structured values drawn from the front of an input (libFuzzer's FuzzedDataProvider): past the end,
    everything reads as zero, so every input is valid to every target."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    @property
    def left(self) -> int:
        return max(0, len(self.raw) - self.pos)

    def take(self, n: int) -> bytes:
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def below(self, n: int) -> int:
        return self.u16() % n if n > 256 else self.u8() % n

    def pick(self, options: tuple[Any, ...] | list[Any]) -> Any:
        return options[self.below(len(options))]

    def rest(self) -> bytes:
        out = self.raw[self.pos :]
        self.pos = len(self.raw)
        return out


@dataclass
class Crash:
    signature: str  # exception type and the innermost evmm frame
    data: bytes
    trace: str
    count: int = 1


@dataclass
class Stats:
    target: str
    runs: int = 0
    seconds: float = 0.0
    lines: int = 0  # distinct evmm lines reached by the guided part
    corpus: int = 0
    crashes: dict[str, Crash] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        return (
            f"{self.target}: {self.runs} inputs in {self.seconds:.0f} s ({rate:.0f}/s), {self.lines} lines, "
            f"corpus {self.corpus}, {len(self.crashes)} distinct crashes"
        )


def _signature(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    inner = [f for f in frames if f.filename.startswith(EVMM_DIR)] or frames
    where = f"{Path(inner[-1].filename).name}:{inner[-1].lineno}" if inner else "?"
    return f"{type(e).__name__} at {where}"


class Coverage:
    """Lines of evmm reached, by ``sys.settrace``: code outside evmm/ is not traced at all."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.new = 0

    def _local(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in self.seen:
                self.seen.add(key)
                self.new += 1
        return self._local

    def _global(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "call" and frame.f_code.co_filename.startswith(EVMM_DIR):
            return self._local
        return None

    def run(self, target: Target, data: bytes) -> int:
        self.new = 0
        sys.settrace(self._global)
        try:
            target(data)
        finally:
            sys.settrace(None)
        return self.new


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(1 + rng.randrange(4)):
        op = rng.randrange(9)
        if not buf or op == 0:  # insert random bytes
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(1 + rng.randrange(16))
        elif op == 1:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 2:  # a random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 3:
            buf[rng.randrange(len(buf))] = rng.choice(INTERESTING_8)
        elif op == 4 and len(buf) >= 2:
            i = rng.randrange(len(buf) - 1)
            buf[i : i + 2] = struct.pack("<H", rng.choice(INTERESTING_16))
        elif op == 5 and len(buf) >= 4:
            i = rng.randrange(len(buf) - 3)
            buf[i : i + 4] = struct.pack("<I", rng.choice(INTERESTING_32))
        elif op == 6:  # delete a run
            i = rng.randrange(len(buf))
            del buf[i : i + 1 + rng.randrange(8)]
        elif op == 7 and corpus:  # splice another input in
            other = rng.choice(corpus)
            i = rng.randrange(len(buf) + 1)
            j = rng.randrange(len(other) + 1)
            buf[i:] = other[j:]
        else:  # duplicate a run (repeated records: chains, frames)
            i = rng.randrange(len(buf))
            chunk = buf[i : i + 1 + rng.randrange(32)]
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = chunk
    return bytes(buf[:MAX_LEN])


def fuzz(
    name: str,
    target: Target,
    runs: int,
    *,
    seed: int = 0,
    seeds: tuple[bytes, ...] = (),
    guided: int = 20_000,
    max_crashes: int = 20,
) -> Stats:
    """Run ``target`` on ``runs`` inputs; every exception that escapes it is a crash (recorded, not raised)."""
    rng = random.Random(seed)
    stats = Stats(name)
    cov = Coverage()
    corpus: list[bytes] = [s for s in seeds] or [b""]
    start = time.monotonic()
    for i in range(runs):
        if i < len(seeds):
            data = seeds[i]
        elif rng.randrange(16) == 0:
            data = rng.randbytes(rng.randrange(256))
        else:
            data = mutate(rng, rng.choice(corpus), corpus)
        try:
            if i < guided:
                if cov.run(target, data):
                    corpus.append(data)
            else:
                target(data)
        except Exception as e:  # a finding: the target let an exception escape
            sig = _signature(e)
            if sig in stats.crashes:
                stats.crashes[sig].count += 1
            else:
                stats.crashes[sig] = Crash(sig, data, "".join(traceback.format_exception(e)))
                if len(stats.crashes) >= max_crashes:
                    stats.runs = i + 1
                    break
        stats.runs = i + 1
    stats.seconds = time.monotonic() - start
    stats.lines = len(cov.seen)
    stats.corpus = len(corpus)
    return stats
