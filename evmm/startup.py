"""Where ``evmm run``'s start-up goes: one lap per step, from ``main()`` to the first vCPU entering KVM_RUN.

``evmm run -v`` logs them in one line when vCPU 0 starts::

    evmm: start-up: main at 12345.678901; cli 12.1 ms, config 0.4 ms, ..., threads 0.3 ms; first KVM_RUN at 12345.801234

``main at`` and ``first KVM_RUN at`` are ``time.monotonic()`` readings (CLOCK_MONOTONIC, one clock for every
process of the host), so a caller that noted the clock before it started evmm also gets exec -> main (the
interpreter, its site and evmm.cli.main's imports) and exec -> first KVM_RUN; scripts/bench_startup.py does.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # when evmm.cli.main imported this, the first thing it does


class Laps:
    def __init__(self, start: float = STARTED) -> None:
        self.start = start
        self.laps: list[tuple[str, float]] = []
        self._last = start

    def lap(self, step: str) -> None:
        """``step`` took the time since the previous lap (or since main)."""
        now = time.monotonic()
        self.laps.append((step, now - self._last))
        self._last = now

    def line(self, first_run: float) -> str:
        """What -v logs once the first vCPU runs; ``first_run`` the time.monotonic() it entered KVM_RUN."""
        laps = [*self.laps, ("threads", first_run - self._last)]
        steps = ", ".join(f"{step} {seconds * 1000:.1f} ms" for step, seconds in laps)
        return f"start-up: main at {self.start:.6f}; {steps}; first KVM_RUN at {first_run:.6f}"


__all__ = ["STARTED", "Laps"]
