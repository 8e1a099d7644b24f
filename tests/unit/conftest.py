"""The event loops of the unit tier's async tests, through pytest-asyncio's own hook.

A module that sets ``LOOP_KINDS = ("asyncio", "uvloop")`` runs each async test on both loops, as its tests
that take the ``loop`` fixture do (tests/conftest.py); every other async test runs on asyncio's loop alone,
under its plain node id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    kinds = getattr(getattr(item, "module", None), "LOOP_KINDS", ("asyncio",))
    return {kind: FACTORIES[kind] for kind in kinds}
