"""Event loops on which an exception in a callback fails the test (the `loop` fixtures in tests/conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop


class CallbackErrors:
    """A loop's exception handler that keeps what it is given.

    asyncio only logs an exception raised in a callback (a reader, a timer, a done callback) and goes on, so
    without this a device that crashed on the reactor would leave its test passing.
    """

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)

    def check(self) -> None:
        if self.contexts:
            lines = []
            for c in self.contexts:
                e = c.get("exception")
                lines.append(f"{c.get('message')}: {e!r}" if e is not None else str(c.get("message")))
            pytest.fail("the event loop's exception handler was called:\n  " + "\n  ".join(lines))


def watched_loop(kind: str = "asyncio") -> tuple[asyncio.AbstractEventLoop, CallbackErrors]:
    """A new loop of ``kind`` ("asyncio" or "uvloop") with a ``CallbackErrors`` as its exception handler."""
    lp = uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
    errors = CallbackErrors()
    lp.set_exception_handler(errors)
    return lp, errors
