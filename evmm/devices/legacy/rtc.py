"""An MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data), IRQ 8, as a pure register model.

Registers follow the Motorola MC146818A datasheet ("Address map", registers A to D).  Time is not kept in
registers: it is the injected host clock (UTC) plus an offset, encoded on each read in the format register B
selects (BCD or binary, 24- or 12-hour).  A guest that sets the time (``hwclock -w``, Linux's
``mc146818_set_time()``) does so by holding B.SET and/or the divider reset (A bits 6:4 = 11x), writing the
time registers, then releasing them: the clock is frozen while held, and on release the written date becomes
the new offset from host time.  Leaving divider reset starts the first update half a second later, as on
the chip; leaving SET starts a fresh second.

What Linux needs, checked against drivers/rtc/rtc-cmos.c and rtc-mc146818-lib.c:

* ``cmos_do_probe()`` rejects the RTC unless ``mc146818_does_rtc_work()`` sees UIP clear within its timeout
  (a floating bus reads A as 0xFF: UIP stuck, the ~second-long boot stalls), requires register D bit 6 clear,
  writes A = 0x26 and requires B.24H set.  B resets to 24-hour BCD (0x02) and D reads VRT only (0x80).
* ``mc146818_avoid_UIP()`` reads seconds, A, the time, A and seconds again, retrying while UIP is set or the
  seconds changed.  UIP is emulated truthfully: it is 1 for the 244 us before each update (datasheet t_BUC)
  and 0 otherwise, so it reads 0 more than 99.9% of the time and never on two reads 1 ms apart.
* The driver requests IRQ 8 and implements alarms, and the RTC core builds update interrupts (RTC_UIE_ON,
  which ``hwclock`` waits on for up to 10 s with select()) out of alarms.  So AF, UF and PF are real: flags are
  computed from the clock when C is read or ``poll()`` runs, and the device asks for a timer, with
  ``set_timer_callback``, at the next instant an *enabled* flag would rise.  The IRQ line is IRQF (C bit 7):
  high while an enabled flag is set, low once C is read.
* The century is CMOS byte 0x32 (Linux reads it when the FADT's ``century`` field names it).

Threads: the RTC is meant for the reactor, but a lock makes it safe on any thread.  ``irq.set_level`` is
called with that lock held (it must not call back into the RTC); the timer callback is called after it is
released.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from evmm.devices.bus import read_bytewise, write_bytewise
from evmm.devices.irq import IrqLine

INDEX_PORT = 0  # offset of 0x70
DATA_PORT = 1  # offset of 0x71
CMOS_SIZE = 128

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
_TIME_REGS = frozenset(
    (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_DAY_OF_WEEK, REG_DAY_OF_MONTH, REG_MONTH, REG_YEAR, REG_CENTURY)
)

A_UIP = 0x80
A_DV_MASK = 0x70
A_DV_32KHZ = 0x20  # normal operation with a 32.768 kHz time base
A_DV_RESET = 0x60  # 11x: divider chain held in reset
A_RS_MASK = 0x0F
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
D_VRT = 0x80

_RESET_A = A_DV_32KHZ | 0x06  # 1024 Hz periodic rate, what Linux programs too
_RESET_B = B_24H
_UIP_WINDOW = 244e-6  # t_BUC: UIP rises this long before an update
_ALARM_DONT_CARE = 0xC0  # an alarm byte with both top bits set matches any value
_FIRST_UPDATE_AFTER_RESET = 0.5  # datasheet: leaving divider reset, the first update is 500 ms later
_DAY = 86400


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's ``days_from_civil``), in plain
    arithmetic: the datetime module would cost every VMM 0.2 MiB for these two conversions."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


_MIN_TIME = float(_days_from_civil(1, 1, 1) * _DAY)  # 0001-01-01 00:00:00 UTC
_MAX_TIME = float(_days_from_civil(9999, 12, 31) * _DAY + _DAY - 1)  # 9999-12-31 23:59:59 UTC
_DAY = 86400


class Rtc:
    """The CMOS clock and its 128 bytes of RAM, mapped at ports 0x70-0x71."""

    def __init__(self, irq: IrqLine, now: Callable[[], float] = time.time) -> None:
        self._irq = irq
        self._now = now
        self._lock = threading.Lock()
        self._timer_cb: Callable[[float | None], None] | None = None
        self._deadline: float | None = None  # last absolute deadline reported to the timer callback
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)  # RAM; holds the time registers only while the clock is stopped
        self._cmos[REG_A] = _RESET_A
        self._cmos[REG_B] = _RESET_B
        self._flags = 0  # C bits 6:4
        self._line = False
        self._offset = 0.0  # guest RTC time minus host time, seconds
        self._last = now()  # flags are up to date to this host time

    # -- the host side --------------------------------------------------------------------------------------

    def set_timer_callback(self, cb: Callable[[float | None], None]) -> None:
        """``cb(delay)``: call ``poll()`` in ``delay`` seconds, cancelling any earlier request; ``None``:
        cancel it.  Called, with no lock held, on the thread whose access (or ``poll``) moved the deadline;
        a ``poll()`` spends the request it answers, so after one only a new deadline is reported."""
        with self._lock:
            self._timer_cb = cb
            self._deadline = None
        self._report_deadline()

    def poll(self) -> None:
        """Bring the interrupt flags up to date with the clock, raise IRQ 8 if an enabled one rose, and ask
        for the next timer.  The timer that called this is taken as spent, so the request is always renewed
        (even if the host timer fired a little early and the deadline has not moved)."""
        with self._lock:
            self._deadline = None
        self._report_deadline()

    # -- the guest side -------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        return read_bytewise(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, offset, size, value)
        self._report_deadline()

    def _read_byte(self, offset: int) -> int:
        if offset != DATA_PORT:
            return 0xFF  # the index port is write-only; past the range the bus floats
        with self._lock:
            reg = self._index
            value = self._read_register(reg)
            self._sync_line()
        if reg == REG_C:
            self._report_deadline()  # clearing the flags may call for the next event
        return value

    def _write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            if offset == INDEX_PORT:
                self._index = value & 0x7F  # bit 7 masks NMI on a PC; there is no NMI to mask here
            elif offset == DATA_PORT:
                self._write_register(self._index, value)
                self._sync_line()

    # -- registers (with _lock held) ------------------------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        if reg == REG_A:
            return self._cmos[REG_A] | (A_UIP if self._update_imminent() else 0)
        if reg == REG_C:
            self._update_flags()
            flags, self._flags = self._flags, 0  # reading C clears every flag and IRQF
            return flags | (C_IRQF if flags & self._cmos[REG_B] & (C_PF | C_AF | C_UF) else 0)
        if reg == REG_D:
            return D_VRT
        if reg in _TIME_REGS and self._running():
            return self._encode_time(self._rtc_time())[reg]
        return self._cmos[reg]

    def _write_register(self, reg: int, value: int) -> None:
        if reg in (REG_C, REG_D):
            return  # read-only
        self._update_flags()
        was_running = self._running()
        if reg in _TIME_REGS and was_running:
            # Setting one field of a running clock: change just that field of the current time, keeping
            # the phase of the second.
            self._hold_time()
            self._cmos[reg] = value
            self._commit_time(self._rtc_time() % 1.0)
            return
        if was_running and (
            (reg == REG_B and value & B_SET) or (reg == REG_A and (value & A_DV_MASK) != A_DV_32KHZ)
        ):
            self._hold_time()  # freeze the time in the format in force before this write
        if reg == REG_A:
            left_reset = (self._cmos[REG_A] & A_DV_RESET) == A_DV_RESET
            self._cmos[REG_A] = value & ~A_UIP & 0xFF
        elif reg == REG_B:
            left_reset = False
            # The datasheet clears UIE while SET is 1: no update, so no update-ended interrupt.
            self._cmos[REG_B] = value & ~B_UIE & 0xFF if value & B_SET else value
        else:
            self._cmos[reg] = value
            return
        if not was_running and self._running():
            self._commit_time(_FIRST_UPDATE_AFTER_RESET if left_reset else 0.0)

    def _running(self) -> bool:
        return (self._cmos[REG_A] & A_DV_MASK) == A_DV_32KHZ and not self._cmos[REG_B] & B_SET

    def _periodic_interval(self) -> float | None:
        """Seconds between periodic flags, or None when RS is 0 or the divider is not running from
        32.768 kHz (datasheet "Periodic interrupt rate" table)."""
        a = self._cmos[REG_A]
        rs = a & A_RS_MASK
        if rs == 0 or a & A_DV_MASK != A_DV_32KHZ:
            return None
        shift = rs + 6 if rs <= 2 else rs - 1  # RS 1 and 2 give 256 Hz and 128 Hz, as 8 and 9 do
        return (1 << shift) / 32768

    def _update_imminent(self) -> bool:
        if not self._running():
            return False
        t = self._rtc_time()
        return t - math.floor(t) >= 1.0 - _UIP_WINDOW

    # -- time and its encoding ------------------------------------------------------------------------------

    def _rtc_time(self, host: float | None = None) -> float:
        t = (self._now() if host is None else host) + self._offset
        return min(max(t, _MIN_TIME), _MAX_TIME)

    def _to_reg(self, n: int) -> int:
        if self._cmos[REG_B] & B_DM_BINARY:
            return n
        return (n // 10) << 4 | n % 10

    def _from_reg(self, v: int) -> int | None:
        """The number a register byte holds in the current mode, or None if it is no valid encoding."""
        n = v if self._cmos[REG_B] & B_DM_BINARY else (v >> 4) * 10 + (v & 0x0F)
        return n if 0 <= n <= 99 and self._to_reg(n) == v else None

    def _hour_to_reg(self, hour: int) -> int:
        if self._cmos[REG_B] & B_24H:
            return self._to_reg(hour)
        return self._to_reg(hour % 12 or 12) | (0x80 if hour >= 12 else 0)  # bit 7: PM

    def _hour_from_reg(self, v: int) -> int | None:
        if self._cmos[REG_B] & B_24H:
            hour = self._from_reg(v)
            return hour if hour is not None and hour < 24 else None
        h12 = self._from_reg(v & 0x7F)
        if h12 is None or not 1 <= h12 <= 12:
            return None
        return h12 % 12 + (12 if v & 0x80 else 0)

    def _encode_time(self, t: float) -> dict[int, int]:
        d = time.gmtime(math.floor(t))  # years 1 to 9999 (t is clamped to them) with a 64-bit time_t
        return {
            REG_SECONDS: self._to_reg(d.tm_sec),
            REG_MINUTES: self._to_reg(d.tm_min),
            REG_HOURS: self._hour_to_reg(d.tm_hour),
            REG_DAY_OF_WEEK: self._to_reg(
                (d.tm_wday + 1) % 7 + 1
            ),  # tm_wday 0 = Monday; the RTC's 1 = Sunday
            REG_DAY_OF_MONTH: self._to_reg(d.tm_mday),
            REG_MONTH: self._to_reg(d.tm_mon),
            REG_YEAR: self._to_reg(d.tm_year % 100),
            REG_CENTURY: self._to_reg(d.tm_year // 100),
        }

    def _decode_time(self) -> float | None:
        c = self._cmos
        fields = (
            self._from_reg(c[REG_CENTURY]),
            self._from_reg(c[REG_YEAR]),
            self._from_reg(c[REG_MONTH]),
            self._from_reg(c[REG_DAY_OF_MONTH]),
            self._hour_from_reg(c[REG_HOURS]),
            self._from_reg(c[REG_MINUTES]),
            self._from_reg(c[REG_SECONDS]),
        )
        century, year, month, day, hour, minute, second = fields
        if century is None or year is None or month is None or day is None:
            return None
        if hour is None or minute is None or second is None:
            return None
        year += century * 100
        if not (1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)):
            return None
        if not (hour < 24 and minute < 60 and second < 60):
            return None
        return float(_days_from_civil(year, month, day) * _DAY + hour * 3600 + minute * 60 + second)

    def _hold_time(self) -> None:
        """Copy the running time into the time registers, which then hold it while the clock is stopped."""
        for reg, value in self._encode_time(self._rtc_time()).items():
            self._cmos[reg] = value

    def _commit_time(self, phase: float) -> None:
        """Restart the clock at the time in the registers; an invalid date leaves the old time running."""
        t = self._decode_time()
        if t is not None:
            self._offset = t + phase - self._now()

    # -- interrupt flags ------------------------------------------------------------------------------------

    def _update_flags(self) -> None:
        """Set C's flags for every event between the last update and now."""
        now = self._now()
        last, self._last = self._last, now
        if now <= last:
            return
        interval = self._periodic_interval()
        if interval is not None and math.floor(now / interval) > math.floor(last / interval):
            self._flags |= C_PF  # the periodic divider keeps running while SET holds updates back
        if not self._running():
            return
        prev_s = math.floor(self._rtc_time(last))
        now_s = math.floor(self._rtc_time(now))
        if now_s > prev_s:
            self._flags |= C_UF
            match = self._next_alarm(prev_s + 1)
            if match is not None and match <= now_s:
                self._flags |= C_AF

    def _alarm_fields(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]] | None:
        """The hours, minutes and seconds the alarm matches, or None if it can never match."""
        c = self._cmos
        hours = self._alarm_values(c[REG_HOURS_ALARM], self._hour_from_reg, 24)
        minutes = self._alarm_values(c[REG_MINUTES_ALARM], self._from_reg, 60)
        seconds = self._alarm_values(c[REG_SECONDS_ALARM], self._from_reg, 60)
        if not (hours and minutes and seconds):
            return None
        return hours, minutes, seconds

    @staticmethod
    def _alarm_values(v: int, decode: Callable[[int], int | None], limit: int) -> Sequence[int]:
        # The chip compares register bytes: a byte that is no valid time encoding never matches.
        if v & _ALARM_DONT_CARE == _ALARM_DONT_CARE:
            return range(limit)
        n = decode(v)
        return (n,) if n is not None and n < limit else ()

    def _next_alarm(self, t: int) -> int | None:
        """The first whole RTC second at or after ``t`` whose time of day the alarm registers match."""
        fields = self._alarm_fields()
        if fields is None:
            return None
        hours, minutes, seconds = fields
        day = t - t % _DAY
        for base, start in ((day, t % _DAY), (day + _DAY, 0)):
            for h in hours:
                if (h + 1) * 3600 <= start:
                    continue
                for m in minutes:
                    if h * 3600 + (m + 1) * 60 <= start:
                        continue
                    for s in seconds:
                        if h * 3600 + m * 60 + s >= start:
                            return base + h * 3600 + m * 60 + s
        return None

    def _sync_line(self) -> None:
        level = bool(self._flags & self._cmos[REG_B] & (C_PF | C_AF | C_UF))
        if level != self._line:
            self._line = level
            self._irq.set_level(level)

    # -- timer requests -------------------------------------------------------------------------------------

    def _next_deadline(self, now: float) -> float | None:
        """The host time at which the next enabled flag that is not already set will rise."""
        want = self._cmos[REG_B] & ~self._flags & (C_PF | C_AF | C_UF)
        candidates: list[float] = []
        interval = self._periodic_interval()
        if want & C_PF and interval is not None:
            candidates.append((math.floor(now / interval) + 1) * interval)
        t = self._rtc_time(now)
        if want & (C_UF | C_AF) and self._running() and t < _MAX_TIME:
            # Computed from the whole RTC second, not from ``now``, so that the same deadline compares
            # equal however often it is recomputed.
            next_second = math.floor(t) + 1
            if want & C_UF:
                candidates.append(next_second - self._offset)
            if want & C_AF:
                match = self._next_alarm(next_second)
                if match is not None:
                    candidates.append(match - self._offset)
        return min(candidates) if candidates else None

    def _report_deadline(self) -> None:
        if self._timer_cb is None:
            return  # no timer to drive: flags are brought up to date when C is read
        with self._lock:
            # Flags first: an event that is already due must raise the line now rather than be skipped by
            # a deadline computed past it.
            self._update_flags()
            self._sync_line()
            cb = self._timer_cb
            now = self._now()
            deadline = self._next_deadline(now)
            if cb is None or deadline == self._deadline:
                return
            self._deadline = deadline
        cb(None if deadline is None else max(deadline - now, 0.0))
