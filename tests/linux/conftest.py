"""The linux tier's ``board`` parameter: device tests run on the microvm board and on the standard board.

A device test that takes ``board`` runs once per board with the same body (virtio-mmio, then virtio-pci with
MSI-X).  The standard-board variant is in the default run only for the tests marked ``both_boards`` (one or
two per device, the data paths); the others run there with EVMM_ALL_BOARDS=1, so that doubling the device
suite does not double the tier's time (docs/standard-board.md says which and why).

It also skips, with EVMM_JAIL=1, the tests marked ``no_jail(reason)``: those that mode cannot run jailed.
"""

from __future__ import annotations

import os

import pytest

from tests.linux import jail_mode

BOARDS = ("microvm", "standard")
ALL_BOARDS_ENV = "EVMM_ALL_BOARDS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_boards: a device test whose standard-board variant is in the default run"
    )
    config.addinivalue_line(
        "markers", "no_jail(reason): a test EVMM_JAIL=1 cannot run under evmm jail (tests/linux/jail_mode.py)"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not jail_mode.enabled():
        return []
    return [
        f"jail mode ({jail_mode.ENV}=1): every evmm run under evmm jail as uid {jail_mode.UID}, "
        f"memory.max = guest memory + {jail_mode.VMM_ALLOWANCE >> 20} MiB"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The one place jail mode skips a test: before the tier deals the rest out to the test hosts.
    if not jail_mode.enabled():
        return
    for item in items:
        mark = item.get_closest_marker("no_jail")
        if mark is not None:
            item.add_marker(pytest.mark.skip(reason=f"{jail_mode.ENV}=1: {mark.args[0]}"))


# tryfirst: ``board`` is always the first parameter, whatever order pytest loaded this conftest in (a whole
# run finds it while collecting, an inner run in the test host from its node ids), so a test's node id is the
# same in both: [microvm-evmm], never [evmm-microvm].
@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "board" not in metafunc.fixturenames:
        return
    default = metafunc.definition.get_closest_marker("both_boards") is not None
    skip = pytest.mark.skip(reason=f"its standard-board variant runs with {ALL_BOARDS_ENV}=1")
    everything = os.environ.get(ALL_BOARDS_ENV) == "1"
    standard = pytest.param("standard", marks=() if default or everything else (skip,))
    metafunc.parametrize("board", ["microvm", standard])
