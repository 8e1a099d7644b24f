"""The 16550A's C fast path: its output ring, and that a UART with it behaves exactly as one without.

The equivalence test drives two UARTs with the same random guest accesses and host input: one the plain
model, the other the model plus the real C fast path, where every one-byte access goes first to the C
decision (``evmm_uart_access``, what the vCPU's ``evmm_run_hooked`` calls for each exit in its ports) and reaches the model only when C
leaves it.  Every value read, every byte sent and every interrupt-line change must be the same.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.legacy.serial import IER, IER_THRI, IIR, LCR, LSR, MCR, MCR_OUT2, THR, Serial
from evmm.devices.legacy.serial_fast import UartFastPath
from tests.fakes.devices import RecordingOutput
from tests.fakes.irq import RecordingIrqLine

BASE = 0x3F8


def test_ring_keeps_order_across_put_and_take() -> None:
    fast = UartFastPath(BASE)
    fast.set(True, True, 0x60)
    fast.put(b"ab")
    assert fast.try_access(True, THR, ord("c")) == ord("c")
    fast.put(b"d")
    assert fast.take() == b"abcd"
    assert fast.take() == b""


def test_a_full_ring_drops_and_counts_instead_of_blocking() -> None:
    fast = UartFastPath(BASE, capacity=8)
    fast.put(b"0123456789")
    assert fast.take() == b"01234567"
    assert fast.dropped == 2


def test_the_eventfd_is_written_when_the_ring_stops_being_empty() -> None:
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fast = UartFastPath(BASE, wake)
        fast.put(b"a")
        fast.put(b"b")  # not empty before: no second wake-up
        assert os.eventfd_read(wake) == 1
        fast.take()
        fast.put(b"c")
        assert os.eventfd_read(wake) == 1
    finally:
        os.close(wake)


def test_only_thr_writes_and_lsr_reads_are_taken_and_only_when_allowed() -> None:
    fast = UartFastPath(BASE)
    assert fast.try_access(True, THR, 1) is None  # nothing allowed yet
    assert fast.try_access(False, LSR) is None
    fast.set(True, True, 0x61)
    assert fast.try_access(False, LSR) == 0x61
    assert fast.try_access(False, IIR) is None
    assert fast.try_access(True, IER, 1) is None
    assert fast.try_access(False, THR) is None  # a read of RBR is not a THR write
    assert fast.try_access(True, THR, 0x4142, size=2) is None  # a word: two byte cycles, the model's
    assert fast.try_access(True, THR, 1) == 1


def test_the_model_opens_the_fast_path_only_where_it_is_free_of_effects() -> None:
    fast = UartFastPath(BASE)
    uart = Serial(RecordingIrqLine(), fast.put, fast=fast)
    assert fast.try_access(True, THR, 0x41) is not None  # reset: THRI off, DLAB clear
    uart.write(LCR, 1, 0x80)  # DLAB: offset 0 is the divisor latch
    assert fast.try_access(True, THR, 0x01) is None
    uart.write(LCR, 1, 0x03)
    uart.write(MCR, 1, MCR_OUT2)
    uart.write(IER, 1, IER_THRI)  # enabling THRI with THR empty raises THRE: already pending
    assert fast.try_access(True, THR, 0x42) is not None
    assert uart.read(IIR, 1) & 0x0F == 0x02  # the pending THRE (C's write kept it pending)
    # Reading IIR cleared it: the next THR write raises the line, so it is the model's.
    assert fast.try_access(True, THR, 0x43) is None
    assert fast.take() == b"AB"


Access = tuple[str, int, int]  # ("r"|"w"|"rx", register, value)
# Mostly what drivers write, so that the states where the fast path matters (OUT2 on, THRE interrupts on,
# DLAB clear, a pending THRE just cleared by an IIR read) come up often; any value now and then.
ACCESS = st.one_of(
    st.tuples(st.just("w"), st.just(THR), st.integers(0x20, 0x7E)),
    st.tuples(st.just("r"), st.sampled_from([LSR, IIR, 0, IER, MCR]), st.just(0)),
    st.tuples(st.just("w"), st.just(IER), st.sampled_from([0, IER_THRI, IER_THRI | 0x01, 0x01, 0x05])),
    st.tuples(st.just("w"), st.just(MCR), st.sampled_from([MCR_OUT2 | 0x03, MCR_OUT2, 0x03, 0x1B])),
    st.tuples(st.just("w"), st.just(LCR), st.sampled_from([0x03, 0x03, 0x83, 0xBF])),
    st.tuples(st.just("w"), st.just(2), st.sampled_from([0x00, 0x01, 0x07, 0xC7])),  # FCR
    st.tuples(st.just("r"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("rx"), st.integers(1, 20), st.just(0)),
)


@settings(max_examples=600, deadline=None)
@given(st.lists(ACCESS, max_size=120))
def test_with_the_fast_path_the_uart_is_the_same_uart(accesses: list[Access]) -> None:
    plain_irq, plain_out = RecordingIrqLine(), RecordingOutput()
    plain = Serial(plain_irq, plain_out)
    fast = UartFastPath(BASE)
    fast_irq = RecordingIrqLine()
    model = Serial(fast_irq, fast.put, fast=fast)

    for kind, reg, value in accesses:
        if kind == "rx":
            data = bytes(range(0x30, 0x30 + reg))
            assert model.receive(data) == plain.receive(data)
        elif kind == "r":
            got = fast.try_access(False, reg)
            if got is None:
                got = model.read(reg, 1)
            assert got == plain.read(reg, 1), (kind, reg)
        else:
            if fast.try_access(True, reg, value) is None:
                model.write(reg, 1, value)
            plain.write(reg, 1, value)
        assert fast_irq.changes == plain_irq.changes, (kind, reg, value)
    assert fast.take() == bytes(plain_out.data)
