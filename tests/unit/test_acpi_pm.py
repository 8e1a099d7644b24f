"""The hardware-reduced ACPI block: S5 power-off, reset, sleep status and the GED power-button event."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.arch.x86.layout import (
    ACPI_GED_EVENT_PCI_HOTPLUG,
    ACPI_GED_EVENT_POWER_BUTTON,
    ACPI_PM_GED_EVENT,
    ACPI_PM_RESET,
    ACPI_PM_SIZE,
    ACPI_PM_SLEEP_CONTROL,
    ACPI_PM_SLEEP_STATUS,
    ACPI_RESET_VALUE,
    ACPI_S5_SLP_TYP,
)
from evmm.devices.acpi_pm import SLP_EN, WAK_STS, AcpiPm
from tests.fakes.devices import CallCounter
from tests.fakes.irq import RecordingInterrupt


def make() -> tuple[AcpiPm, RecordingInterrupt, CallCounter, CallCounter]:
    ged, poweroff, reset = RecordingInterrupt(), CallCounter(), CallCounter()
    return AcpiPm(ged, poweroff, reset), ged, poweroff, reset


def test_s5_powers_off_the_way_acpica_asks() -> None:
    pm, _, poweroff, reset = make()
    # acpi_hw_extended_sleep(): clear WAK_STS, write SLP_TYPx | SLP_EN, wait for WAK_STS.
    pm.write(ACPI_PM_SLEEP_STATUS, 1, WAK_STS)
    pm.write(ACPI_PM_SLEEP_CONTROL, 1, ACPI_S5_SLP_TYP << 2 | SLP_EN)
    assert poweroff.count == 1
    assert reset.count == 0


def test_slp_typ_without_slp_en_does_nothing() -> None:
    pm, _, poweroff, _ = make()
    pm.write(ACPI_PM_SLEEP_CONTROL, 1, ACPI_S5_SLP_TYP << 2)  # acpi_hw_extended_wake_prep() style
    assert poweroff.count == 0
    assert pm.read(ACPI_PM_SLEEP_CONTROL, 1) == ACPI_S5_SLP_TYP << 2  # SLP_TYPx reads back, SLP_EN not


@pytest.mark.parametrize("slp_typ", [0, 1, 2, 3, 4, 6, 7])
def test_other_sleep_states_are_ignored_and_the_guest_wakes_at_once(slp_typ: int) -> None:
    pm, _, poweroff, reset = make()
    pm.write(ACPI_PM_SLEEP_CONTROL, 1, slp_typ << 2 | SLP_EN)
    assert (poweroff.count, reset.count) == (0, 0)
    assert pm.read(ACPI_PM_SLEEP_STATUS, 1) & WAK_STS  # the wait loop in ACPICA ends at once


def test_reset_register() -> None:
    pm, _, poweroff, reset = make()
    pm.write(ACPI_PM_RESET, 1, ACPI_RESET_VALUE ^ 1)
    assert reset.count == 0
    pm.write(ACPI_PM_RESET, 1, ACPI_RESET_VALUE)
    assert reset.count == 1
    assert poweroff.count == 0
    assert pm.read(ACPI_PM_RESET, 1) == 0  # write-only


def test_power_button_sets_the_event_and_triggers_the_ged() -> None:
    pm, ged, poweroff, _ = make()
    assert pm.read(ACPI_PM_GED_EVENT, 1) == 0
    pm.power_button()
    assert ged.count == 1
    assert pm.read(ACPI_PM_GED_EVENT, 1) == ACPI_GED_EVENT_POWER_BUTTON
    assert pm.read(ACPI_PM_GED_EVENT, 1) == 0  # reading acknowledged it
    assert poweroff.count == 0  # only the guest decides to power off


def test_events_raised_together_are_read_together_once() -> None:
    pm, ged, _, _ = make()
    pm.ged_event(ACPI_GED_EVENT_PCI_HOTPLUG)
    pm.power_button()
    assert ged.count == 2
    assert pm.read(ACPI_PM_GED_EVENT, 1) == ACPI_GED_EVENT_PCI_HOTPLUG | ACPI_GED_EVENT_POWER_BUTTON == 0b11
    assert pm.read(ACPI_PM_GED_EVENT, 1) == 0


def test_wide_access_covers_each_register() -> None:
    pm, _, _, _ = make()
    pm.write(ACPI_PM_SLEEP_CONTROL, 1, 3 << 2)
    pm.power_button()
    assert pm.read(0, 4) == ACPI_GED_EVENT_POWER_BUTTON << 24 | WAK_STS << 8 | 3 << 2
    assert pm.read(ACPI_PM_GED_EVENT, 1) == 0
    assert pm.read(0x10, 4) == 0  # reserved
    assert pm.read(ACPI_PM_SIZE - 1, 1) == 0


def test_power_button_presses_from_another_thread_are_never_lost() -> None:
    pm, ged, _, _ = make()
    presses = 2000
    seen = 0
    done = threading.Event()

    def reactor() -> None:
        for _ in range(presses):
            pm.power_button()
        done.set()

    t = threading.Thread(target=reactor)
    t.start()
    while not done.is_set():
        seen += pm.read(ACPI_PM_GED_EVENT, 1)
    t.join()
    seen += pm.read(ACPI_PM_GED_EVENT, 1)
    assert ged.count == presses
    assert 1 <= seen <= presses  # presses coalesce in the bit, but the last one is always seen
    assert pm.read(ACPI_PM_GED_EVENT, 1) == 0


_op = st.tuples(
    st.booleans(), st.integers(0, ACPI_PM_SIZE - 1), st.sampled_from([1, 2, 4, 8]), st.integers(0, 255)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40))
def test_no_access_sequence_raises(ops: list[tuple[bool, int, int, int]]) -> None:
    pm, _, _, _ = make()
    for is_read, offset, size, value in ops:
        if is_read:
            assert 0 <= pm.read(offset, size) < 1 << (8 * size)
        else:
            pm.write(offset, size, value)
