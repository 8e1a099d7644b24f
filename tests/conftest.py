"""Test tiers (see tests/tiers.py), event loops that fail a test on a callback's exception, and the linux
tier's fixtures: guests that never outlive their test."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any

import pytest

from evmm.assets import GuestAssets
from tests.linux.harness import Guest
from tests.loops import CallbackErrors, watched_loop
from tests.tiers import COST, HOST_SIDE, TierPlugin


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{HOST_SIDE}: a linux-tier test of the KVM test host itself, run outside it"
    )
    config.addinivalue_line(
        "markers",
        f"{COST}(seconds): a linux-tier test that takes far longer than most in a one-vCPU KVM test host;"
        " the tier balances its test hosts with it",
    )
    config.pluginmanager.register(TierPlugin(config), "evmm-tiers")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A module that sets LOOP_KINDS = ("asyncio", "uvloop") runs each of its tests that take `loop` on both.
    kinds = getattr(metafunc.module, "LOOP_KINDS", None)
    if kinds is not None and "loop" in metafunc.fixturenames:
        metafunc.parametrize("loop", kinds, indirect=True)


@pytest.fixture
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh event loop for a test that drives it itself (``run_until_complete``, a reactor thread); an
    exception in any of its callbacks fails the test.  asyncio's by default, uvloop's with LOOP_KINDS."""
    lp, errors = watched_loop(getattr(request, "param", "asyncio"))
    try:
        yield lp
        errors.check()
    finally:
        lp.close()


@pytest.fixture
async def running_loop_errors() -> AsyncIterator[CallbackErrors]:
    """The same for the loop pytest-asyncio runs a coroutine test in (every coroutine test gets it)."""
    errors = CallbackErrors()
    asyncio.get_running_loop().set_exception_handler(errors)
    yield errors
    await asyncio.sleep(0)  # callbacks the test left scheduled run, and may fail
    errors.check()


@pytest.fixture(autouse=True)
def _coroutine_tests_fail_on_callback_errors(request: pytest.FixtureRequest) -> None:
    if inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        request.getfixturevalue("running_loop_errors")


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """The default guest; built here when missing, except inside the test host (its host root is read-only)."""
    from evmm.assets import build_default_guest, default_guest

    if os.environ.get("EVMM_IN_TESTHOST") == "1":
        return default_guest()
    return build_default_guest()


GuestFactory = Callable[[Sequence[str], str], Guest]


@pytest.fixture
def launch(request: pytest.FixtureRequest) -> Iterator[GuestFactory]:
    """``launch(argv, name)`` starts a VMM with its console on pipes; all are killed when the test ends.
    With EVMM_JAIL=1 each ``evmm run`` runs under ``evmm jail`` (tests/linux/jail_mode.py)."""
    from tests.linux import jail_mode

    guests: list[Guest] = []
    jails = jail_mode.Jails() if jail_mode.enabled() else None

    def start(argv: Sequence[str], name: str = "guest") -> Guest:
        if jails is not None:
            argv = jails.wrap(argv, name)
        guest = Guest(argv, name)
        guests.append(guest)
        return guest

    request.node.evmm_guests = guests
    yield start
    try:
        for guest in guests:
            guest.close()
    finally:
        if jails is not None:
            jails.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # A failing linux-tier test carries every console it drove, whole, in its report.
    if report.failed:
        for guest in getattr(item, "evmm_guests", []):
            report.sections.append((f"console of {guest.name}: {' '.join(guest.argv[:4])} ...", guest.log))
    return report
