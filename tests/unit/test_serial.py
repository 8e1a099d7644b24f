"""The 16550A model: registers, Linux's probe sequences, interrupts, RX backpressure and thread safety."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.legacy.serial import (
    DLL,
    DLM,
    FCR,
    IER,
    IER_MSI,
    IER_RDI,
    IER_RLSI,
    IER_THRI,
    IIR,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_DR,
    LSR_OE,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR,
    RBR,
    RX_FIFO_SIZE,
    SCR,
    THR,
    Serial,
)
from tests.fakes.devices import CallCounter, RecordingOutput, StrictIrqLine
from tests.fakes.irq import RecordingIrqLine

UART_EFR = 2  # Linux's name for offset 2 when LCR is 0xBF


def make() -> tuple[Serial, RecordingIrqLine, RecordingOutput]:
    irq = RecordingIrqLine()
    out = RecordingOutput()
    return Serial(irq, out), irq, out


def rd(uart: Serial, reg: int) -> int:
    return uart.read(reg, 1)


def wr(uart: Serial, reg: int, value: int) -> None:
    uart.write(reg, 1, value)


def linux_startup(uart: Serial) -> None:
    """What serial8250_do_startup() + set_termios() leave behind: 8N1, FIFO at 8 bytes, OUT2|DTR|RTS."""
    wr(uart, FCR, 0x01)
    wr(uart, FCR, 0x07)
    wr(uart, FCR, 0x00)
    for reg in (LSR, RBR, IIR, MSR):
        rd(uart, reg)
    wr(uart, LCR, 0x03)
    wr(uart, MCR, MCR_OUT2 | MCR_DTR | MCR_RTS)
    wr(uart, FCR, 0x81)  # UART_FCR_ENABLE_FIFO | UART_FCR_R_TRIG_10


# -- registers ---------------------------------------------------------------------------------------------


def test_reset_state() -> None:
    uart, irq, _ = make()
    assert rd(uart, IER) == 0
    assert rd(uart, IIR) == 0x01  # no interrupt, FIFOs off
    assert rd(uart, LCR) == 0
    assert rd(uart, MCR) == 0
    assert rd(uart, LSR) == LSR_THRE | LSR_TEMT
    assert rd(uart, MSR) == 0xB0  # DCD | DSR | CTS, no deltas
    assert rd(uart, SCR) == 0
    assert irq.changes == []


def test_dlab_selects_divisor_latch() -> None:
    uart, _, out = make()
    wr(uart, LCR, LCR_DLAB | 0x03)
    wr(uart, DLL, 0x01)
    wr(uart, DLM, 0x02)
    assert rd(uart, DLL) == 0x01
    assert rd(uart, DLM) == 0x02
    assert out.data == b""  # a DLL write is not a THR write
    wr(uart, LCR, 0x03)
    assert rd(uart, IER) == 0  # IER, not DLM
    wr(uart, IER, IER_RDI)
    wr(uart, LCR, LCR_DLAB)
    assert rd(uart, DLM) == 0x02
    wr(uart, LCR, 0)
    assert rd(uart, IER) == IER_RDI
    assert rd(uart, RBR) == 0  # RBR, not DLL, and empty


def test_scratch_register_and_ier_mask() -> None:
    uart, _, _ = make()
    wr(uart, SCR, 0xA5)
    assert rd(uart, SCR) == 0xA5
    wr(uart, IER, 0xFF)
    assert rd(uart, IER) == 0x0F  # bits 7:4 do not exist on a 16550A


def test_out_of_range_offsets_float_high_and_wide_accesses_split() -> None:
    uart, _, _ = make()
    assert uart.read(8, 1) == 0xFF
    uart.write(8, 1, 0x41)
    uart.write(SCR, 2, 0x4142)  # SCR gets 0x42; the byte past the range is dropped
    assert rd(uart, SCR) == 0x42
    assert uart.read(SCR, 2) == 0xFF42
    assert uart.read(LSR, 2) == 0xB0 << 8 | LSR_THRE | LSR_TEMT  # LSR then MSR


# -- Linux's probes (drivers/tty/serial/8250/8250_port.c) ----------------------------------------------------


def test_linux_autoconfig_detects_a_16550a() -> None:
    uart, irq, out = make()
    # autoconfig(): the IER existence test.
    scratch = rd(uart, IER)
    wr(uart, IER, 0)
    scratch2 = rd(uart, IER) & 0x0F
    wr(uart, IER, 0x0F)
    scratch3 = rd(uart, IER) & 0x0F
    wr(uart, IER, scratch)
    assert (scratch2, scratch3) == (0, 0x0F)
    # The loopback test.
    save_mcr = rd(uart, MCR)
    save_lcr = rd(uart, LCR)
    wr(uart, MCR, MCR_LOOP | 0x0A)
    status1 = rd(uart, MSR) & 0xF0
    wr(uart, MCR, save_mcr)
    assert status1 == 0x90  # UART_MSR_DCD | UART_MSR_CTS
    # FIFO type from IIR bits 7:6.
    wr(uart, LCR, 0xBF)
    wr(uart, UART_EFR, 0)
    wr(uart, LCR, 0)
    wr(uart, FCR, 0x01)
    assert rd(uart, IIR) >> 6 == 3  # -> autoconfig_16550a()
    # autoconfig_16550a(): no EFR with LCR = 0x80 or 0xBF ...
    wr(uart, LCR, 0x80)
    assert rd(uart, UART_EFR) != 0
    wr(uart, LCR, 0xBF)
    assert rd(uart, UART_EFR) != 0
    # ... not an NS16550 SuperIO (EXCR1 at offset 2 with LCR 0xE0 does not follow MCR.LOOP) ...
    wr(uart, LCR, 0)
    status1 = rd(uart, MCR)
    wr(uart, LCR, 0xE0)
    status2 = rd(uart, 2)
    assert not (status1 ^ status2) & MCR_LOOP
    wr(uart, LCR, 0)
    wr(uart, MCR, status1 ^ MCR_LOOP)
    wr(uart, LCR, 0xE0)
    status2 = rd(uart, 2)
    wr(uart, LCR, 0)
    wr(uart, MCR, status1)
    assert not (status2 ^ status1) & MCR_LOOP
    # ... not a 16750 (IIR bit 5 never set) ...
    wr(uart, FCR, 0x21)
    status1 = rd(uart, IIR) & 0xE0
    wr(uart, FCR, 0x01)
    wr(uart, LCR, 0x80)
    wr(uart, FCR, 0x21)
    status2 = rd(uart, IIR) & 0xE0
    wr(uart, FCR, 0x01)
    wr(uart, LCR, 0)
    assert (status1, status2) == (0xC0, 0xC0)
    # ... and not an XScale (IER.UUE does not stick).
    iersave = rd(uart, IER)
    wr(uart, IER, iersave | 0x40)
    assert not rd(uart, IER) & 0x40
    wr(uart, IER, iersave)
    wr(uart, LCR, save_lcr)
    # The probe never raised the interrupt line or printed anything.
    assert irq.changes == []
    assert out.data == b""


def test_linux_startup_thre_tests_pass() -> None:
    uart, irq, _ = make()
    wr(uart, FCR, 0x01)
    # UART_BUG_THRE test: THRE must be raised on enabling, cleared by IIR, and raised again on re-enabling.
    wr(uart, IER, IER_THRI)
    iir1 = rd(uart, IIR)
    wr(uart, IER, 0)
    wr(uart, IER, IER_THRI)
    iir = rd(uart, IIR)
    wr(uart, IER, 0)
    assert iir1 & 0x0F == 0x02
    assert not iir & 0x01
    # UART_BUG_TXEN test.
    wr(uart, IER, IER_THRI)
    lsr = rd(uart, LSR)
    iir = rd(uart, IIR)
    wr(uart, IER, 0)
    assert not (lsr & LSR_TEMT and iir & 0x01)
    # OUT2 was never set, so none of this reached the interrupt controller.
    assert irq.changes == []


# -- interrupts ----------------------------------------------------------------------------------------------


def test_thre_interrupt_semantics() -> None:
    uart, irq, out = make()
    linux_startup(uart)
    wr(uart, IER, IER_THRI)
    assert irq.level
    assert rd(uart, IIR) == 0xC2
    assert not irq.level  # reading IIR cleared THRE, the source
    assert rd(uart, IIR) == 0xC1
    wr(uart, THR, ord("x"))
    assert out.data == b"x"
    assert irq.level  # written and transmitted: THRE pending again
    wr(uart, THR, ord("y"))  # writing THR clears and re-raises without a glitch on the line
    assert irq.changes == [True, False, True]
    wr(uart, IER, 0)
    assert not irq.level
    assert rd(uart, IIR) == 0xC1


def test_out2_gates_the_line_but_not_iir() -> None:
    uart, irq, _ = make()
    wr(uart, IER, IER_THRI)
    assert rd(uart, IIR) == 0x02
    wr(uart, IER, 0)
    wr(uart, IER, IER_THRI)
    assert irq.changes == []  # pending, but OUT2 is clear
    wr(uart, MCR, MCR_OUT2)
    assert irq.level
    wr(uart, MCR, MCR_OUT2 | MCR_LOOP)  # loopback forces OUT2 inactive
    assert not irq.level
    wr(uart, MCR, 0)
    assert irq.changes == [True, False]


def test_iir_priorities() -> None:
    uart, irq, _ = make()
    wr(uart, FCR, 0x01)  # FIFO on, trigger level 1
    wr(uart, MCR, MCR_LOOP)
    assert rd(uart, MSR) == 0x0B  # leaving the cable for loopback dropped DCD, DSR and CTS
    for b in range(RX_FIFO_SIZE + 1):  # one more than fits: overrun
        wr(uart, THR, b)
    wr(uart, MCR, MCR_LOOP | MCR_RTS)  # CTS changes: a modem status delta
    wr(uart, IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    assert rd(uart, IIR) == 0xC6  # receiver line status first
    assert rd(uart, LSR) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert rd(uart, IIR) == 0xC4  # then received data
    assert [rd(uart, RBR) for _ in range(RX_FIFO_SIZE)] == list(range(RX_FIFO_SIZE))
    assert rd(uart, IIR) == 0xC2  # then THRE, cleared by this read
    assert rd(uart, IIR) == 0xC0  # then modem status
    assert rd(uart, MSR) == 0x11  # CTS and DCTS; the read clears the delta
    assert rd(uart, IIR) == 0xC1
    assert irq.changes == []  # loopback: nothing on the line


def test_rx_interrupt_below_trigger_level_is_character_timeout() -> None:
    uart, irq, _ = make()
    linux_startup(uart)  # trigger level 8
    wr(uart, IER, IER_RDI)
    assert uart.receive(b"abc") == 3
    assert irq.level
    assert rd(uart, IIR) == 0xCC
    assert uart.receive(b"defgh") == 5
    assert rd(uart, IIR) == 0xC4
    assert bytes(rd(uart, RBR) for _ in range(8)) == b"abcdefgh"
    assert not irq.level
    assert rd(uart, LSR) & LSR_DR == 0


def test_interrupt_driven_output_like_serial8250_tx_chars() -> None:
    irq = StrictIrqLine()
    out = RecordingOutput()
    uart = Serial(irq, out)
    linux_startup(uart)
    message = bytes(range(256)) * 4
    pending = bytearray(message)
    wr(uart, IER, IER_RDI | IER_THRI)  # start_tx
    interrupts = 0
    while irq.level:
        interrupts += 1
        iir = rd(uart, IIR)
        lsr = rd(uart, LSR)
        if iir & 0x0F == 0x02 or lsr & LSR_THRE:
            for _ in range(16):  # tx_loadsz of a 16550A
                if not pending:
                    break
                wr(uart, THR, pending.pop(0))
            if not pending:
                wr(uart, IER, IER_RDI)  # stop_tx
    assert bytes(out.data) == message
    assert interrupts == len(message) // 16  # one per 16 bytes: never polled
    assert irq.redundant == 0  # set_level only on a change


# -- receive and backpressure --------------------------------------------------------------------------------


def test_fifo_backpressure_and_rx_space_callback() -> None:
    uart, _, _ = make()
    space = CallCounter()
    uart.set_rx_space_callback(space)
    linux_startup(uart)
    data = bytes(range(40))
    taken = uart.receive(data)
    assert taken == RX_FIFO_SIZE
    assert uart.receive(data[taken:]) == 0
    assert rd(uart, LSR) & LSR_OE == 0  # the host never overruns the FIFO
    got = bytearray()
    for _ in range(RX_FIFO_SIZE - 1):
        got.append(rd(uart, RBR))
    assert space.count == 0  # not drained yet
    got.append(rd(uart, RBR))
    assert space.count == 1  # drained after a short receive
    while taken < len(data):
        taken += uart.receive(data[taken:])
        while rd(uart, LSR) & LSR_DR:
            got.append(rd(uart, RBR))
    assert bytes(got) == data
    assert space.count == 2  # after each short receive, not after the final complete one
    rd(uart, RBR)
    assert space.count == 2


def test_rx_space_callback_not_called_when_everything_fit() -> None:
    uart, _, _ = make()
    space = CallCounter()
    uart.set_rx_space_callback(space)
    wr(uart, FCR, 0x01)
    assert uart.receive(b"hello") == 5
    assert bytes(rd(uart, RBR) for _ in range(5)) == b"hello"
    assert space.count == 0


def test_rx_space_callback_may_push_more_from_inside() -> None:
    uart, _, _ = make()
    wr(uart, FCR, 0x01)
    data = bytearray(b"x" * 50)

    def refill() -> None:  # called with no lock held, so it may call receive() right away
        del data[: uart.receive(bytes(data))]

    uart.set_rx_space_callback(refill)
    del data[: uart.receive(bytes(data))]
    got = 0
    while rd(uart, LSR) & LSR_DR:
        rd(uart, RBR)
        got += 1
    assert got == 50
    assert not data


def test_fifo_disabled_holds_one_byte_and_fcr_clears() -> None:
    uart, _, _ = make()
    space = CallCounter()
    uart.set_rx_space_callback(space)
    assert uart.receive(b"ab") == 1  # 16450 mode: one holding register
    wr(uart, FCR, 0x01)  # switching to FIFO mode clears the FIFOs
    assert rd(uart, LSR) & LSR_DR == 0
    assert space.count == 1  # the guest discarded the data: room again
    assert uart.receive(b"bcd") == 3
    wr(uart, FCR, 0x03)  # clear RX
    assert rd(uart, LSR) & LSR_DR == 0


def test_loopback_wiring_and_no_output() -> None:
    uart, _, out = make()
    wr(uart, MCR, MCR_LOOP)
    rd(uart, MSR)
    wr(uart, MCR, MCR_LOOP | MCR_DTR)
    assert rd(uart, MSR) == 0x20 | 0x02  # DSR, DDSR
    wr(uart, MCR, MCR_LOOP | MCR_OUT1)
    assert rd(uart, MSR) == 0x40 | 0x02  # RI, DDSR (DSR fell); no TERI on a rising RI
    wr(uart, MCR, MCR_LOOP)
    assert rd(uart, MSR) == 0x04  # TERI: RI's trailing edge
    wr(uart, MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS)
    assert rd(uart, MSR) == 0x80 | 0x10 | 0x08 | 0x01  # DCD, CTS, DDCD, DCTS
    wr(uart, THR, 0x55)
    assert rd(uart, RBR) == 0x55
    assert uart.receive(b"z") == 0  # the serial input is disconnected in loopback
    assert out.data == b""
    wr(uart, MCR, 0)
    assert rd(uart, MSR) == 0xB0 | 0x02  # the cable again; DSR rose


def test_loopback_overrun_in_16450_mode_overwrites() -> None:
    uart, _, _ = make()
    wr(uart, MCR, MCR_LOOP)
    wr(uart, THR, 1)
    wr(uart, THR, 2)
    assert rd(uart, LSR) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert rd(uart, LSR) & LSR_OE == 0  # cleared by the read
    assert rd(uart, RBR) == 2


# -- threads -------------------------------------------------------------------------------------------------


def test_receive_from_one_thread_while_another_reads_loses_and_duplicates_nothing() -> None:
    uart, irq, _ = make()
    linux_startup(uart)
    wr(uart, IER, IER_RDI)
    data = bytes(i * 7 % 251 for i in range(8000))
    room = threading.Event()
    uart.set_rx_space_callback(room.set)
    got = bytearray()
    done = threading.Event()

    short = 0

    def host() -> None:
        nonlocal short
        sent = 0
        while sent < len(data):
            room.clear()
            chunk = data[sent : sent + 64]
            n = uart.receive(chunk)
            sent += n
            if n < len(chunk):
                short += 1
            if n == 0:
                room.wait(0.01)  # the callback wakes us; the timeout covers the race with clear()

    def guest() -> None:
        while len(got) < len(data):
            if rd(uart, LSR) & LSR_DR:
                got.append(rd(uart, RBR))
            else:
                time.sleep(0)  # let the host thread have the GIL
        done.set()

    threads = [threading.Thread(target=host), threading.Thread(target=guest)]
    for t in threads:
        t.start()
    assert done.wait(60)
    for t in threads:
        t.join()
    assert bytes(got) == data
    assert short > len(data) // 64  # the FIFO really pushed back
    assert not irq.level  # drained: the level ended where the last change left it


def test_concurrent_writers_keep_each_threads_bytes_in_order_and_the_line_consistent() -> None:
    irq = StrictIrqLine()
    out = RecordingOutput()
    uart = Serial(irq, out)
    linux_startup(uart)
    wr(uart, IER, IER_THRI | IER_RDI)

    def writer(tag: int) -> None:
        for i in range(2000):
            wr(uart, THR, tag | (i % 16))

    def iir_reader() -> None:
        for _ in range(4000):
            rd(uart, IIR)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in (0x10, 0x20, 0x30)]
    threads.append(threading.Thread(target=iir_reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out.data) == 6000
    for tag in (0x10, 0x20, 0x30):
        mine = [b & 0x0F for b in out.data if b & 0xF0 == tag]
        assert mine == [i % 16 for i in range(2000)]
    assert irq.redundant == 0
    # Quiescent: the line shows exactly whether an interrupt is pending, whichever thread changed it last.
    level = irq.level
    assert level == (rd(uart, IIR) != 0xC1)
    assert not irq.level  # that IIR read cleared THRE


# -- robustness ----------------------------------------------------------------------------------------------

_op = st.tuples(
    st.sampled_from(["read", "write", "receive"]),
    st.integers(0, 9),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 0xFFFF_FFFF),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_no_access_sequence_raises(ops: list[tuple[str, int, int, int]]) -> None:
    uart, irq, _ = make()
    for kind, offset, size, value in ops:
        if kind == "read":
            assert 0 <= uart.read(offset, size) < 1 << (8 * size)
        elif kind == "write":
            uart.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            data = value.to_bytes(4, "little")[:size]
            assert 0 <= uart.receive(data) <= size
        mcr = rd(uart, MCR)
        assert not irq.level or (mcr & MCR_OUT2 and not mcr & MCR_LOOP)
