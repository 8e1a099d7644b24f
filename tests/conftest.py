"""Test tiers (see tests/tiers.py) and the linux tier's fixtures: guests that never outlive their test."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import pytest

from evmm.assets import GuestAssets
from tests.linux.harness import Guest
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
    """``launch(argv, name)`` starts a VMM with its console on pipes; all are killed when the test ends."""
    guests: list[Guest] = []

    def start(argv: Sequence[str], name: str = "guest") -> Guest:
        guest = Guest(argv, name)
        guests.append(guest)
        return guest

    request.node.evmm_guests = guests
    yield start
    for guest in guests:
        guest.close()


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
