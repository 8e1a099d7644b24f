"""The linux tier's ``board`` parameter: device tests run on the microvm board and on the standard board.

A device test that takes ``board`` runs once per board with the same body (virtio-mmio, then virtio-pci with
MSI-X).  The standard-board variant is in the default run only for the tests marked ``both_boards`` (one or
two per device, the data paths); the others run there with EVMM_ALL_BOARDS=1, so that doubling the device
suite does not double the tier's time (docs/standard-board.md says which and why).
"""

from __future__ import annotations

import os

import pytest

BOARDS = ("microvm", "standard")
ALL_BOARDS_ENV = "EVMM_ALL_BOARDS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_boards: a device test whose standard-board variant is in the default run"
    )


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
