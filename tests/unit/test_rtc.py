"""The MC146818 model: encodings, UIP, Linux's read/set/probe sequences, interrupts and the timer requests."""

from __future__ import annotations

import calendar
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.legacy import rtc
from evmm.devices.legacy.rtc import (
    A_UIP,
    B_24H,
    B_AIE,
    B_DM_BINARY,
    B_PIE,
    B_SET,
    B_UIE,
    C_AF,
    C_IRQF,
    C_PF,
    C_UF,
    REG_A,
    REG_B,
    REG_C,
    REG_CENTURY,
    REG_D,
    REG_DAY_OF_MONTH,
    REG_DAY_OF_WEEK,
    REG_HOURS,
    REG_HOURS_ALARM,
    REG_MINUTES,
    REG_MINUTES_ALARM,
    REG_MONTH,
    REG_SECONDS,
    REG_SECONDS_ALARM,
    REG_YEAR,
    Rtc,
)
from tests.fakes.devices import FakeClock, TimerRequests
from tests.fakes.irq import RecordingIrqLine

# Thursday 2024-02-29 13:45:56.25 UTC
T0 = calendar.timegm((2024, 2, 29, 13, 45, 56)) + 0.25


def make(t: float = T0) -> tuple[Rtc, RecordingIrqLine, FakeClock]:
    clock = FakeClock(t)
    irq = RecordingIrqLine()
    return Rtc(irq, now=clock), irq, clock


def cmos_read(rtc: Rtc, reg: int) -> int:
    rtc.write(0, 1, reg)
    return rtc.read(1, 1)


def cmos_write(rtc: Rtc, reg: int, value: int) -> None:
    rtc.write(0, 1, reg)
    rtc.write(1, 1, value)


def bcd2bin(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


def bin2bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def linux_get_time(rtc: Rtc) -> tuple[int, int, int, int, int, int]:
    """mc146818_avoid_UIP() with mc146818_get_time_callback(), century from CMOS 0x32 as with an ACPI FADT."""
    for _ in range(10):
        seconds = cmos_read(rtc, REG_SECONDS)
        if cmos_read(rtc, REG_A) & A_UIP:
            continue
        if seconds != cmos_read(rtc, REG_SECONDS):
            continue
        minute = cmos_read(rtc, REG_MINUTES)
        hour = cmos_read(rtc, REG_HOURS)
        mday = cmos_read(rtc, REG_DAY_OF_MONTH)
        mon = cmos_read(rtc, REG_MONTH)
        year = cmos_read(rtc, REG_YEAR)
        century = cmos_read(rtc, REG_CENTURY)
        ctrl = cmos_read(rtc, REG_B)
        if cmos_read(rtc, REG_A) & A_UIP or seconds != cmos_read(rtc, REG_SECONDS):
            continue
        fields = [seconds, minute, hour, mday, mon, year, century]
        if not ctrl & B_DM_BINARY:
            fields = [bcd2bin(f) for f in fields]
        seconds, minute, hour, mday, mon, year, century = fields
        return century * 100 + year, mon, mday, hour, minute, seconds
    raise AssertionError("UIP never cleared")


def linux_set_time(rtc: Rtc, year: int, mon: int, mday: int, hour: int, minute: int, sec: int) -> None:
    """mc146818_set_time() with an ACPI century register."""
    century, yrs = divmod(year, 100)
    fields = [yrs, mon, mday, hour, minute, sec, century]
    if not cmos_read(rtc, REG_B) & B_DM_BINARY:
        fields = [bin2bcd(f) for f in fields]
    save_control = cmos_read(rtc, REG_B)
    cmos_write(rtc, REG_B, save_control | B_SET)
    save_freq_select = cmos_read(rtc, REG_A)
    cmos_write(rtc, REG_A, save_freq_select | 0x70)  # RTC_DIV_RESET2
    for reg, value in zip(
        (REG_YEAR, REG_MONTH, REG_DAY_OF_MONTH, REG_HOURS, REG_MINUTES, REG_SECONDS, REG_CENTURY),
        fields,
        strict=True,
    ):
        cmos_write(rtc, reg, value)
    cmos_write(rtc, REG_B, save_control)
    cmos_write(rtc, REG_A, save_freq_select)


# -- registers and encodings ---------------------------------------------------------------------------------


def test_reset_registers() -> None:
    rtc, irq, _ = make()
    assert cmos_read(rtc, REG_A) == 0x26
    assert cmos_read(rtc, REG_B) == B_24H
    assert cmos_read(rtc, REG_D) == 0x80  # VRT, and bit 6 clear as rtc-cmos demands
    assert cmos_read(rtc, REG_C) & C_IRQF == 0
    assert irq.changes == []


def test_time_in_bcd_24_hour() -> None:
    rtc, _, _ = make()
    regs = {r: cmos_read(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, REG_CENTURY)}
    assert regs == {0: 0x56, 2: 0x45, 4: 0x13, 6: 0x05, 7: 0x29, 8: 0x02, 9: 0x24, REG_CENTURY: 0x20}


def test_time_in_binary() -> None:
    rtc, _, _ = make()
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY)
    regs = {r: cmos_read(rtc, r) for r in (0, 2, 4, 6, 7, 8, 9, REG_CENTURY)}
    assert regs == {0: 56, 2: 45, 4: 13, 6: 5, 7: 29, 8: 2, 9: 24, REG_CENTURY: 20}


@pytest.mark.parametrize(
    ("hour", "bcd", "binary"),
    [(0, 0x12, 12), (1, 0x01, 1), (11, 0x11, 11), (12, 0x92, 0x8C), (13, 0x81, 0x81), (23, 0x91, 0x8B)],
)
def test_twelve_hour_modes(hour: int, bcd: int, binary: int) -> None:
    rtc, _, _ = make(calendar.timegm((2024, 2, 29, hour, 0, 0)) + 0.5)
    cmos_write(rtc, REG_B, 0)  # 12-hour BCD
    assert cmos_read(rtc, REG_HOURS) == bcd
    cmos_write(rtc, REG_B, B_DM_BINARY)  # 12-hour binary
    assert cmos_read(rtc, REG_HOURS) == binary


def test_day_of_week_is_one_on_sunday() -> None:
    rtc, _, _ = make(calendar.timegm((2024, 3, 3, 12, 0, 0)))  # a Sunday
    assert cmos_read(rtc, REG_DAY_OF_WEEK) == 1


def test_uip_only_in_the_244_us_before_an_update() -> None:
    second = calendar.timegm((2024, 2, 29, 13, 45, 56))
    rtc, _, clock = make(second + 0.9999)
    assert cmos_read(rtc, REG_A) & A_UIP
    clock.t = second + 0.9997
    assert not cmos_read(rtc, REG_A) & A_UIP
    clock.t = second + 1.0001
    assert not cmos_read(rtc, REG_A) & A_UIP
    clock.t = second + 0.9999
    cmos_write(rtc, REG_B, B_24H | B_SET)  # SET clears UIP
    assert not cmos_read(rtc, REG_A) & A_UIP


def test_uip_reads_zero_almost_always() -> None:
    second = calendar.timegm((2024, 2, 29, 13, 45, 56))
    rtc, _, clock = make(second)
    set_count = 0
    for ms in range(1000):
        clock.t = second + ms / 1000 + 0.0005
        set_count += bool(cmos_read(rtc, REG_A) & A_UIP)
    assert set_count <= 1


def test_cmos_ram_nmi_bit_and_ports() -> None:
    rtc, _, _ = make()
    cmos_write(rtc, 0x8E, 0x5A)  # index bit 7 is the NMI mask: ignored
    assert cmos_read(rtc, 0x0E) == 0x5A
    cmos_write(rtc, 0x7F, 0xA5)
    assert cmos_read(rtc, 0x7F) == 0xA5
    assert rtc.read(0, 1) == 0xFF  # the index port is write-only
    rtc.write(0, 2, 0x77 << 8 | 0x40)  # outw: index, then data
    assert cmos_read(rtc, 0x40) == 0x77
    assert rtc.read(1, 2) & 0xFF00 == 0xFF00  # past the range
    cmos_write(rtc, REG_D, 0)
    assert cmos_read(rtc, REG_D) == 0x80  # read-only


# -- Linux's sequences (drivers/rtc/rtc-mc146818-lib.c, rtc-cmos.c) ------------------------------------------


def test_linux_reads_the_time() -> None:
    rtc, _, _ = make()
    assert linux_get_time(rtc) == (2024, 2, 29, 13, 45, 56)


def test_rtc_cmos_probe_path() -> None:
    rtc, irq, _ = make()
    # mc146818_does_rtc_work(): mc146818_avoid_UIP() with no callback succeeds on the first try.
    seconds = cmos_read(rtc, REG_SECONDS)
    assert not cmos_read(rtc, REG_A) & A_UIP
    assert seconds == cmos_read(rtc, REG_SECONDS)
    # cmos_do_probe()
    cmos_write(rtc, REG_A, 0x26)  # RTC_REF_CLCK_32KHZ | 0x06
    control = cmos_read(rtc, REG_B)  # cmos_irq_disable()
    cmos_write(rtc, REG_B, control & ~(B_PIE | B_AIE | B_UIE))
    cmos_read(rtc, REG_C)
    assert cmos_read(rtc, REG_B) & B_24H  # else "only 24-hr supported"
    assert linux_get_time(rtc) == (2024, 2, 29, 13, 45, 56)
    assert irq.changes == []


def test_linux_sets_the_time_as_an_offset_from_the_host_clock() -> None:
    rtc, _, clock = make()
    linux_set_time(rtc, 2031, 7, 14, 8, 9, 10)
    assert linux_get_time(rtc) == (2031, 7, 14, 8, 9, 10)
    clock.advance(0.4)  # leaving divider reset, the first update comes 500 ms later
    assert linux_get_time(rtc) == (2031, 7, 14, 8, 9, 10)
    clock.advance(0.2)
    assert linux_get_time(rtc) == (2031, 7, 14, 8, 9, 11)
    clock.advance(86400)
    assert linux_get_time(rtc) == (2031, 7, 15, 8, 9, 11)
    other, _, _ = make(clock.t)  # the host clock itself is untouched
    assert linux_get_time(other) == (2024, 3, 1, 13, 45, 56)


def test_time_set_in_binary_mode() -> None:
    rtc, _, _ = make()
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY)
    linux_set_time(rtc, 1999, 12, 31, 23, 59, 59)
    assert linux_get_time(rtc) == (1999, 12, 31, 23, 59, 59)


def test_time_is_frozen_while_set_is_held() -> None:
    rtc, _, clock = make()
    cmos_write(rtc, REG_B, B_24H | B_SET)
    clock.advance(5)
    assert cmos_read(rtc, REG_SECONDS) == 0x56
    cmos_write(rtc, REG_MINUTES, 0x10)
    assert cmos_read(rtc, REG_MINUTES) == 0x10
    cmos_write(rtc, REG_B, B_24H)
    clock.advance(1)
    assert linux_get_time(rtc) == (2024, 2, 29, 13, 10, 57)


def test_an_invalid_date_leaves_the_old_time_running() -> None:
    rtc, _, clock = make()
    cmos_write(rtc, REG_B, B_24H | B_SET)
    cmos_write(rtc, REG_MONTH, 0x13)
    cmos_write(rtc, REG_B, B_24H)
    clock.advance(2)
    assert linux_get_time(rtc) == (2024, 2, 29, 13, 45, 58)


def test_writing_one_field_of_the_running_clock() -> None:
    rtc, _, clock = make()
    cmos_write(rtc, REG_HOURS, 0x07)
    assert linux_get_time(rtc) == (2024, 2, 29, 7, 45, 56)
    clock.advance(0.8)  # the phase of the second is kept: 56.25 + 0.8 crosses into 57
    assert linux_get_time(rtc) == (2024, 2, 29, 7, 45, 57)


# -- interrupts and timer requests ---------------------------------------------------------------------------


def test_update_interrupt() -> None:
    rtc, irq, clock = make()
    timer = TimerRequests()
    rtc.set_timer_callback(timer)
    assert timer.requests == []  # nothing enabled: no timer
    cmos_read(rtc, REG_C)
    cmos_write(rtc, REG_B, B_24H | B_UIE)
    assert timer.last == pytest.approx(0.75)
    clock.t = T0 + 0.74
    rtc.poll()  # early: nothing yet, but the timer is asked for again
    assert not irq.level
    assert timer.last == pytest.approx(0.01)
    clock.t = T0 + 0.75  # 13:45:57 exactly
    asked = len(timer.requests)
    rtc.poll()
    assert irq.level
    assert len(timer.requests) == asked  # UF is set: nothing more to wait for until C is read
    assert cmos_read(rtc, REG_C) & (C_IRQF | C_UF) == C_IRQF | C_UF
    assert not irq.level
    assert timer.last == pytest.approx(1.0)
    cmos_write(rtc, REG_B, B_24H)
    assert timer.last is None
    assert irq.changes == [True, False]


def test_alarm_interrupt() -> None:
    rtc, irq, clock = make()
    timer = TimerRequests()
    rtc.set_timer_callback(timer)
    cmos_write(rtc, REG_SECONDS_ALARM, 0x00)
    cmos_write(rtc, REG_MINUTES_ALARM, 0x46)
    cmos_write(rtc, REG_HOURS_ALARM, 0x13)
    cmos_read(rtc, REG_C)
    cmos_write(rtc, REG_B, B_24H | B_AIE)
    assert timer.last == pytest.approx(3.75)
    clock.advance(2.0)
    rtc.poll()
    assert not irq.level
    assert cmos_read(rtc, REG_C) == C_PF | C_UF  # flags rise without their enables, but no IRQF
    clock.advance(1.75)
    rtc.poll()
    assert irq.level
    assert cmos_read(rtc, REG_C) == C_IRQF | C_PF | C_AF | C_UF
    assert not irq.level
    assert timer.last == pytest.approx(86400.0)  # the same time tomorrow


def test_alarm_dont_care_fields() -> None:
    rtc, irq, clock = make()
    timer = TimerRequests()
    rtc.set_timer_callback(timer)
    cmos_write(rtc, REG_SECONDS_ALARM, 0x30)
    cmos_write(rtc, REG_MINUTES_ALARM, 0xC0)
    cmos_write(rtc, REG_HOURS_ALARM, 0xFF)
    cmos_read(rtc, REG_C)
    cmos_write(rtc, REG_B, B_24H | B_AIE)
    assert timer.last == pytest.approx(33.75)  # 13:46:30
    clock.advance(33.75 + 60 * 5)  # missed several matches: AF is still set once
    rtc.poll()
    assert irq.level
    assert cmos_read(rtc, REG_C) & C_AF


def test_alarm_in_twelve_hour_mode_and_an_impossible_alarm() -> None:
    rtc, _, _ = make()
    timer = TimerRequests()
    rtc.set_timer_callback(timer)
    cmos_write(rtc, REG_B, 0)  # 12-hour BCD
    cmos_write(rtc, REG_SECONDS_ALARM, 0x00)
    cmos_write(rtc, REG_MINUTES_ALARM, 0x00)
    cmos_write(rtc, REG_HOURS_ALARM, 0x82)  # 2 PM
    cmos_read(rtc, REG_C)
    cmos_write(rtc, REG_B, B_AIE)
    assert timer.last == pytest.approx(14 * 60 + 3.75)  # 13:45:56.25 -> 14:00:00
    cmos_write(rtc, REG_HOURS_ALARM, 0x13)  # not a 12-hour value: never matches
    cmos_write(rtc, REG_B, B_AIE | B_24H)
    cmos_write(rtc, REG_HOURS_ALARM, 0x24)  # nor is hour 24 in 24-hour mode
    assert timer.last is None


def test_periodic_interrupt() -> None:
    rtc, irq, clock = make()
    timer = TimerRequests()
    rtc.set_timer_callback(timer)
    cmos_write(rtc, REG_A, 0x2F)  # RS = 15: every 500 ms
    cmos_read(rtc, REG_C)
    cmos_write(rtc, REG_B, B_24H | B_PIE)
    assert timer.last == pytest.approx(0.25)  # T0 sits 250 ms into a 500 ms period
    clock.advance(0.25)
    rtc.poll()
    assert irq.level
    assert cmos_read(rtc, REG_C) == C_IRQF | C_PF
    assert timer.last == pytest.approx(0.5)
    cmos_write(rtc, REG_A, 0x20)  # RS = 0: off
    assert timer.last is None


def test_no_updates_while_the_divider_is_reset() -> None:
    rtc, _, clock = make()
    cmos_read(rtc, REG_C)
    cmos_write(rtc, REG_A, 0x76)
    clock.advance(3)
    assert cmos_read(rtc, REG_C) == 0
    assert cmos_read(rtc, REG_SECONDS) == 0x56


# -- robustness ----------------------------------------------------------------------------------------------

_op = st.tuples(
    st.sampled_from(["read", "write", "poll"]),
    st.integers(0, 2),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 0xFFFF_FFFF),
    st.floats(0, 100_000, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60), st.floats(-1e11, 3e11, allow_nan=False))
def test_no_access_sequence_raises(ops: list[tuple[str, int, int, int, float]], start: float) -> None:
    rtc, _, clock = make(start)
    timer = TimerRequests()
    rtc.set_timer_callback(timer)
    for kind, offset, size, value, dt in ops:
        clock.advance(dt)
        if kind == "read":
            assert 0 <= rtc.read(offset, size) < 1 << (8 * size)
        elif kind == "write":
            rtc.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            rtc.poll()
        assert all(d is None or d >= 0 for d in timer.requests)


def test_the_date_arithmetic_agrees_with_the_datetime_module() -> None:
    """The RTC converts dates itself (datetime costs a VMM 0.2 MiB): every day of three spans of 300 years
    (the clock's first and last, and one over 1900 and 2000, a century and a 400-year leap rule), every
    month's length, and the ends of the clock's range, against datetime and calendar."""
    epoch = datetime.datetime(1970, 1, 1)
    for first, last in ((1, 300), (1800, 2100), (9700, 9999)):
        day, end = datetime.date(first, 1, 1), datetime.date(last, 12, 31)
        while True:
            want = (datetime.datetime(day.year, day.month, day.day) - epoch).days
            assert rtc._days_from_civil(day.year, day.month, day.day) == want, day
            if day == end:
                break
            day += datetime.timedelta(days=1)
    for year in range(1, 10000):
        for month in range(1, 13):
            assert rtc._days_in_month(year, month) == calendar.monthrange(year, month)[1], (year, month)
    assert (datetime.datetime(1, 1, 1) - epoch).total_seconds() == rtc._MIN_TIME
    assert (datetime.datetime(9999, 12, 31, 23, 59, 59) - epoch).total_seconds() == rtc._MAX_TIME
