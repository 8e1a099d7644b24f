"""Fakes for the legacy devices' host-side hooks: a settable clock, output sinks, counting callbacks."""

from __future__ import annotations

import threading


class FakeClock:
    """A ``now()`` that only moves when a test moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class RecordingOutput:
    """An ``output(bytes)`` sink that keeps everything written, safe to call from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.data = bytearray()
        self.calls = 0

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self.data += data
            self.calls += 1


class CallCounter:
    """A no-argument callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class TimerRequests:
    """The RTC's timer callback: the delays it asked for, in order (None: cancel)."""

    def __init__(self) -> None:
        self.requests: list[float | None] = []

    def __call__(self, delay: float | None) -> None:
        self.requests.append(delay)

    @property
    def last(self) -> float | None:
        return self.requests[-1] if self.requests else None


class StrictIrqLine:
    """An ``IrqLine`` that records every call, so a test can see calls that did not change the level."""

    def __init__(self) -> None:
        self.level = False
        self.calls: list[bool] = []
        self.redundant = 0  # calls that set the level it already had

    def set_level(self, high: bool) -> None:
        if high == self.level:
            self.redundant += 1
        self.level = high
        self.calls.append(high)

    @property
    def rising_edges(self) -> int:
        return sum(1 for c in self.calls if c)
