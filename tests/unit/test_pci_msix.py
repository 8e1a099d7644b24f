"""MSI-X semantics (PCI 3.0 §6.8.2): the capability, the table and PBA, per-vector and function masking,
pending bits held while masked and released on unmask, lazy routing, and hostile table accesses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.pci.config import ConfigSpace
from evmm.devices.pci.msix import Msix
from tests.fakes.pci import RecordingMsiSink

ADDR = 0xFEE0_1000  # an x86 MSI address: the LAPIC window, destination 1
ENABLE, FUNCTION_MASK = 0x8000, 0x4000


def msix(vectors: int = 4) -> tuple[Msix, ConfigSpace, int, RecordingMsiSink]:
    sink = RecordingMsiSink()
    m = Msix(vectors, sink)
    cfg = ConfigSpace()
    cap = m.add_capability(cfg, bar=2, table_offset=0x1000, pba_offset=0x1800)
    return m, cfg, cap, sink


def control(m: Msix, cfg: ConfigSpace, cap: int, value: int) -> None:
    cfg.write(cap + 2, 2, value)
    m.control_written()


def program(m: Msix, vector: int, address: int = ADDR, data: int = 0x40, masked: bool = False) -> None:
    base = 16 * vector
    m.table_write(base, 8, address)  # a qword store of both address halves
    m.table_write(base + 8, 4, data)
    m.table_write(base + 12, 4, int(masked))


def test_the_capability_describes_the_table_and_pba() -> None:
    _, cfg, cap, _ = msix(vectors=5)
    assert cfg.capabilities() == [(cap, 0x11)]
    assert cfg.read(cap + 2, 2) == 4  # table size N-1, disabled, not masked
    assert cfg.read(cap + 4, 4) == 0x1000 | 2  # table offset | BIR
    assert cfg.read(cap + 8, 4) == 0x1800 | 2
    cfg.write(cap + 2, 2, 0xFFFF)
    assert cfg.read(cap + 2, 2) == 0xC004  # only enable and function mask are writable
    cfg.write(cap + 4, 4, 0)
    assert cfg.read(cap + 4, 4) == 0x1002


def test_every_vector_starts_masked_and_the_table_reads_back() -> None:
    m, _, _, _ = msix()
    assert all(m.masked(v) for v in range(4))
    assert m.table_read(12, 4) == 1
    program(m, 1, address=0x1_FEE0_0004, data=0x4021)
    assert m.table_read(16, 8) == 0x1_FEE0_0004  # 64-bit address, one qword read
    assert m.table_read(24, 4) == 0x4021 and not m.masked(1)


def test_a_masked_vector_is_held_pending_and_sent_when_unmasked() -> None:
    m, cfg, cap, sink = msix()
    control(m, cfg, cap, ENABLE)
    program(m, 2, data=0x51, masked=True)
    assert m.trigger(2) is True
    assert sink.take() == [] and m.pending(2)
    assert m.pba_read(0, 8) == 1 << 2
    m.table_write(2 * 16 + 12, 4, 0)  # unmask
    assert sink.take() == [("route", 2, ADDR, 0x51), ("fire", 2)]
    assert not m.pending(2) and m.pba_read(0, 8) == 0


def test_several_triggers_while_masked_send_one_message() -> None:
    m, cfg, cap, sink = msix()
    control(m, cfg, cap, ENABLE)
    program(m, 0, masked=True)
    for _ in range(3):
        m.trigger(0)
    m.table_write(12, 4, 0)
    assert sink.fired() == [0]


def test_the_function_mask_holds_every_vector_and_releases_them_in_order() -> None:
    m, cfg, cap, sink = msix()
    control(m, cfg, cap, ENABLE | FUNCTION_MASK)
    for v in (3, 1):
        program(m, v, data=0x60 + v)
        m.trigger(v)
    program(m, 0, masked=True)
    m.trigger(0)
    assert sink.take() == [] and m.pba_read(0, 4) == 0b1011
    control(m, cfg, cap, ENABLE)
    assert sink.fired() == [1, 3]  # vector 0 is still masked by its own bit
    assert m.pending(0) and not m.pending(1)


def test_enabling_msix_releases_nothing_that_was_never_pending_and_disabled_means_no_msix() -> None:
    m, cfg, cap, sink = msix()
    program(m, 0)
    assert m.trigger(0) is False  # the caller falls back to INTx
    assert not m.pending(0)
    control(m, cfg, cap, ENABLE)
    assert sink.take() == []
    assert m.trigger(0) is True and sink.fired() == [0]
    assert m.trigger(4) is False  # no such vector


def test_routing_is_lazy_and_follows_changes_to_the_entry() -> None:
    m, cfg, cap, sink = msix()
    control(m, cfg, cap, ENABLE)
    program(m, 1, data=0x41)
    m.trigger(1)
    m.trigger(1)
    assert sink.take() == [("route", 1, ADDR, 0x41), ("fire", 1), ("fire", 1)]
    m.table_write(16 + 8, 4, 0x41)  # same data: nothing to route again
    m.trigger(1)
    assert sink.take() == [("fire", 1)]
    m.table_write(16 + 8, 4, 0x42)
    m.table_write(16, 4, 0xFEE0_2000)
    m.trigger(1)
    assert sink.take() == [("route", 1, 0xFEE0_2000, 0x42), ("fire", 1)]


@pytest.mark.parametrize(
    ("offset", "size"),
    [(1, 4), (2, 2), (0, 1), (4, 8), (64, 4), (60, 8), (-4, 4), (0, 16)],
)
def test_table_accesses_that_are_not_aligned_dwords_or_qwords_inside_the_table_do_nothing(
    offset: int, size: int
) -> None:
    m, _, _, _ = msix()
    before = [m.table_read(i, 4) for i in range(0, 64, 4)]
    m.table_write(offset, size, (1 << (8 * size)) - 1)
    assert m.table_read(offset, size) == 0
    assert [m.table_read(i, 4) for i in range(0, 64, 4)] == before


def test_reserved_bits_read_as_zero() -> None:
    m, _, _, _ = msix()
    m.table_write(12, 4, 0xFFFF_FFFE)  # reserved bits of Vector Control, mask clear
    assert m.table_read(12, 4) == 0
    m.table_write(0, 4, 0xFEE0_0003)  # the message address is dword aligned
    assert m.table_read(0, 4) == 0xFEE0_0000


def test_the_pba_is_read_only_and_sized_in_qwords() -> None:
    m, cfg, cap, _ = msix(vectors=70)
    control(m, cfg, cap, ENABLE)
    m.trigger(65)
    assert m.pba_read(8, 8) == 1 << 1
    assert m.pba_read(8, 4) == 1 << 1 and m.pba_read(12, 4) == 0
    assert m.pba_read(16, 4) == 0  # past the two qwords
    m.table_write(65 * 16 + 12, 4, 1)  # still masked
    assert m.pending(65)


def test_reset_masks_every_vector_and_forgets_pending_and_enables() -> None:
    m, cfg, cap, sink = msix()
    control(m, cfg, cap, ENABLE)
    program(m, 0, masked=True)
    m.trigger(0)
    m.reset()
    assert all(m.masked(v) for v in range(4)) and not m.pending(0)
    assert cfg.read(cap + 2, 2) == 3 and not m.enabled
    assert m.table_read(0, 8) == 0 and m.table_read(8, 4) == 0
    assert sink.take() == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("trigger"), st.integers(0, 3)),
            st.tuples(st.just("mask"), st.integers(0, 3), st.booleans()),
            st.tuples(st.just("control"), st.booleans(), st.booleans()),
        ),
        max_size=40,
    )
)
def test_a_message_is_sent_exactly_when_no_mask_holds_it(ops: list[tuple[object, ...]]) -> None:
    """The model against the rules: for each vector, each trigger is sent now if deliverable, else it is
    pending; a pending vector is sent (once) the moment it becomes deliverable."""
    m, cfg, cap, sink = msix()
    enabled, fmask = False, False
    masked = [True] * 4
    pending = [False] * 4
    expect: list[int] = []
    for op in ops:
        if op[0] == "trigger":
            v = int(op[1])  # type: ignore[call-overload]
            m.trigger(v)
            if enabled:
                if fmask or masked[v]:
                    pending[v] = True
                else:
                    expect.append(v)
        elif op[0] == "mask":
            v, on = int(op[1]), bool(op[2])  # type: ignore[call-overload]
            m.table_write(16 * v + 12, 4, int(on))
            masked[v] = on
        else:
            enabled, fmask = bool(op[1]), bool(op[2])
            control(m, cfg, cap, ENABLE * enabled | FUNCTION_MASK * fmask)
        if enabled and not fmask:
            for v in range(4):
                if pending[v] and not masked[v]:
                    pending[v] = False
                    expect.append(v)
    assert sink.fired() == expect
    assert [m.pending(v) for v in range(4)] == pending
