"""The i8042 model: Linux's probe, reset, keyboard replies, translation, Ctrl-Alt-Del and IRQ 1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.legacy.i8042 import (
    CTR_KBDDIS,
    CTR_KBDINT,
    CTR_SYS,
    CTR_XLATE,
    I8042,
    STATUS_A2,
    STATUS_AUXDATA,
    STATUS_IBF,
    STATUS_OBF,
    STATUS_SYS,
    STATUS_UNLOCKED,
)
from tests.fakes.devices import CallCounter
from tests.fakes.irq import RecordingIrqLine

SET1_CAD = bytes((0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D))
SET2_CAD = bytes((0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14))


def make() -> tuple[I8042, RecordingIrqLine, CallCounter]:
    irq = RecordingIrqLine()
    reset = CallCounter()
    return I8042(irq, reset), irq, reset


def status(kbc: I8042) -> int:
    return kbc.command_port.read(0, 1)


def command(kbc: I8042, cmd: int, *data: int) -> None:
    assert not status(kbc) & STATUS_IBF  # i8042_wait_write()
    kbc.command_port.write(0, 1, cmd)
    for b in data:
        kbc.data_port.write(0, 1, b)


def drain(kbc: I8042) -> bytes:
    """Poll like i8042_flush(): read while OBF is set."""
    out = bytearray()
    for _ in range(64):
        if not status(kbc) & STATUS_OBF:
            break
        out.append(kbc.data_port.read(0, 1))
    return bytes(out)


def keyboard(kbc: I8042, *data: int) -> bytes:
    for b in data:
        kbc.data_port.write(0, 1, b)
    return drain(kbc)


def set_ctr(kbc: I8042, ctr: int) -> None:
    command(kbc, 0x60, ctr)


def test_reset_status() -> None:
    kbc, irq, _ = make()
    assert status(kbc) == STATUS_SYS | STATUS_UNLOCKED
    command(kbc, 0x20)
    assert status(kbc) & STATUS_A2
    assert drain(kbc) == bytes((CTR_KBDINT | CTR_SYS | CTR_XLATE,))
    assert irq.changes == [True, False]  # the CTR reply raised IRQ 1 while it sat in the buffer


def test_linux_probe_sequence() -> None:
    kbc, _, reset = make()
    # i8042_controller_check(): the flush ends, there is a controller.
    assert drain(kbc) == b""
    # i8042_controller_selftest()
    command(kbc, 0xAA)
    assert drain(kbc) == b"\x55"
    # i8042_controller_init(): a stable CTR, no keylock, CTR written back.
    command(kbc, 0x20)
    ctr0 = drain(kbc)
    command(kbc, 0x20)
    assert drain(kbc) == ctr0
    assert status(kbc) & STATUS_UNLOCKED
    ctr = (ctr0[0] | CTR_KBDDIS) & ~CTR_KBDINT
    set_ctr(kbc, ctr)
    assert not status(kbc) & STATUS_A2  # the last write went to the data port
    command(kbc, 0x20)
    assert drain(kbc) == bytes((ctr,))
    # i8042_check_aux(): the AUX loop fails at once (the byte is not AUX data) ...
    command(kbc, 0xD3, 0x5A)
    assert status(kbc) & (STATUS_OBF | STATUS_AUXDATA) == STATUS_OBF
    assert drain(kbc) == b"\x5a"
    # ... and the AUX interface test reports an error, so Linux decides there is no AUX port.
    command(kbc, 0xA9)
    param = drain(kbc)[0]
    assert param not in (0x00, 0xFA, 0xFF)
    # i8042_enable_kbd_port()
    set_ctr(kbc, (ctr & ~CTR_KBDDIS) | CTR_KBDINT)
    assert reset.count == 0


def test_aux_enable_and_disable_toggle_the_ctr_bit() -> None:
    kbc, _, _ = make()
    command(kbc, 0xA7)
    command(kbc, 0x20)
    assert drain(kbc)[0] & 0x20
    command(kbc, 0xA8)
    command(kbc, 0x20)
    assert not drain(kbc)[0] & 0x20


def test_reboot_k_pulses_reset() -> None:
    kbc, _, reset = make()
    for _ in range(10):  # native_machine_emergency_restart(), BOOT_KBD
        assert not status(kbc) & STATUS_IBF  # kb_wait()
        kbc.command_port.write(0, 1, 0xFE)
    assert reset.count == 10


@pytest.mark.parametrize(
    ("cmd", "pulses"), [(0xF0, True), (0xFC, True), (0xFE, True), (0xFF, False), (0xFD, False)]
)
def test_pulse_commands(cmd: int, pulses: bool) -> None:
    kbc, _, reset = make()
    command(kbc, cmd)
    assert reset.count == int(pulses)


def test_output_port_reset_bit() -> None:
    kbc, _, reset = make()
    command(kbc, 0xD1, 0xDF)  # arch/x86/boot/a20.c: A20 on, reset high
    assert reset.count == 0
    command(kbc, 0xD0)
    assert drain(kbc)[0] & 0x03 == 0x03
    command(kbc, 0xD1, 0xFE)
    assert reset.count == 1


def test_keyboard_replies_translated() -> None:
    kbc, _, _ = make()  # CTR.XLATE is set at reset
    assert keyboard(kbc, 0xFF) == b"\xfa\xaa"
    assert keyboard(kbc, 0xF2) == b"\xfa\xab\x41"  # 0x83 translates to 0x41: atkbd sees id 0xab41
    assert keyboard(kbc, 0xED, 0x07) == b"\xfa\xfa"
    assert keyboard(kbc, 0xF3, 0x20) == b"\xfa\xfa"
    assert keyboard(kbc, 0xF0, 0x00) == b"\xfa\xfa\x41"  # each byte acked, then set 2, translated
    assert keyboard(kbc, 0xEE) == b"\xee"
    assert keyboard(kbc, 0xF4) == b"\xfa"
    assert keyboard(kbc, 0x42) == b"\xfa"  # anything else is acknowledged
    assert keyboard(kbc, 0xFE) == b"\xfa"  # resend the last byte


def test_keyboard_replies_untranslated_and_set_selection() -> None:
    kbc, _, _ = make()
    set_ctr(kbc, CTR_KBDINT | CTR_SYS)
    assert keyboard(kbc, 0xF2) == b"\xfa\xab\x83"
    assert keyboard(kbc, 0xF0, 0x03) == b"\xfa\xfe"  # set 3 refused: atkbd stays in set 2
    assert keyboard(kbc, 0xF0, 0x01) == b"\xfa\xfa"
    assert keyboard(kbc, 0xF0, 0x00) == b"\xfa\xfa\x01"
    assert kbc.ctrl_alt_del()
    assert drain(kbc) == SET1_CAD
    assert keyboard(kbc, 0xF6) == b"\xfa"  # defaults: set 2 again
    assert kbc.ctrl_alt_del()
    assert drain(kbc) == SET2_CAD


def test_ctrl_alt_del_translated_by_interrupts() -> None:
    """The way i8042_interrupt() sees it: one byte per IRQ 1 edge."""
    kbc, irq, _ = make()
    irq.changes.clear()
    assert kbc.ctrl_alt_del()
    got = bytearray()
    while irq.level:
        assert status(kbc) & STATUS_OBF
        got += bytes((kbc.data_port.read(0, 1),))
    assert bytes(got) == SET1_CAD
    assert irq.rising_edges == len(SET1_CAD)  # a fresh edge for every byte


def test_ctrl_alt_del_untranslated() -> None:
    kbc, _, _ = make()
    set_ctr(kbc, CTR_KBDINT | CTR_SYS)
    assert kbc.ctrl_alt_del()
    assert drain(kbc) == SET2_CAD


def test_ctrl_alt_del_refused_when_the_keyboard_does_not_scan_or_is_full() -> None:
    kbc, irq, _ = make()
    assert keyboard(kbc, 0xF5) == b"\xfa"  # atkbd_deactivate()
    assert not kbc.ctrl_alt_del()
    assert drain(kbc) == b""
    assert keyboard(kbc, 0xF4) == b"\xfa"  # atkbd_activate()
    command(kbc, 0xAD)  # keyboard interface disabled: keys are held in the keyboard
    assert kbc.ctrl_alt_del()
    assert not kbc.ctrl_alt_del()  # 11 + 11 bytes do not fit in 16
    assert drain(kbc) == b""
    command(kbc, 0xAE)
    assert drain(kbc) == SET1_CAD
    assert not irq.level


def test_no_irq_without_the_keyboard_interrupt_enabled() -> None:
    kbc, irq, _ = make()
    set_ctr(kbc, CTR_SYS | CTR_XLATE)
    irq.changes.clear()
    assert kbc.ctrl_alt_del()
    assert status(kbc) & STATUS_OBF
    assert irq.changes == []
    set_ctr(kbc, CTR_SYS | CTR_XLATE | CTR_KBDINT)  # enabling it with data waiting raises the line
    assert irq.level
    assert drain(kbc) == SET1_CAD


def test_d2_writes_the_keyboard_output_buffer() -> None:
    kbc, _, _ = make()
    command(kbc, 0xD2, 0x14)
    assert drain(kbc) == b"\x14"  # as if from the keyboard, but not translated


def test_controller_ram_and_a_data_write_reenables_the_keyboard() -> None:
    kbc, _, _ = make()
    command(kbc, 0x65, 0x99)
    command(kbc, 0x25)
    assert drain(kbc) == b"\x99"
    command(kbc, 0xAD)
    kbc.data_port.write(0, 1, 0xF4)  # writing to the keyboard enables its interface again
    assert drain(kbc) == b"\xfa"
    command(kbc, 0x20)
    assert not drain(kbc)[0] & CTR_KBDDIS


def test_self_test_sets_and_ctr_clears_the_system_flag() -> None:
    kbc, _, _ = make()
    set_ctr(kbc, CTR_KBDINT)
    assert not status(kbc) & STATUS_SYS
    command(kbc, 0xAA)
    drain(kbc)
    assert status(kbc) & STATUS_SYS


def test_wide_and_odd_accesses() -> None:
    kbc, _, _ = make()
    assert kbc.command_port.read(0, 2) == 0xFF00 | STATUS_SYS | STATUS_UNLOCKED
    assert kbc.data_port.read(1, 1) == 0xFF
    kbc.command_port.write(1, 1, 0xFE)  # not the register
    kbc.command_port.write(0, 2, 0xAAAA)  # only the low byte reaches it
    assert drain(kbc) == b"\x55"


_op = st.tuples(
    st.sampled_from(["data_read", "data_write", "status", "command", "cad"]),
    st.integers(0, 255),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=80))
def test_no_access_sequence_raises(ops: list[tuple[str, int, int, int]]) -> None:
    kbc, irq, _ = make()
    for kind, value, size, offset in ops:
        if kind == "data_read":
            assert 0 <= kbc.data_port.read(offset, size) < 1 << (8 * size)
        elif kind == "data_write":
            kbc.data_port.write(offset, size, value)
        elif kind == "status":
            assert 0 <= kbc.command_port.read(offset, size) < 1 << (8 * size)
        elif kind == "command":
            kbc.command_port.write(offset, size, value)
        else:
            kbc.ctrl_alt_del()
        assert not irq.level or status(kbc) & STATUS_OBF
