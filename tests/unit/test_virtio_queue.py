"""The split virtqueue and descriptor chains against a driver-side fake, hostile chains included."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.virtio.chain import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    InvalidChain,
)
from evmm.devices.virtio.queue import (
    QueueBroken,
    QueueConfig,
    Virtqueue,
    check_queue_config,
    vring_need_event,
)
from tests.fakes.virtio_driver import MEM_SIZE, Allocator, DriverQueue, new_memory

MEM = new_memory()


def make_queue(size: int = 16, *, event_idx: bool = False) -> tuple[DriverQueue, Virtqueue]:
    dq = DriverQueue(MEM, 0x10000, size, Allocator())
    vq = Virtqueue(0, QueueConfig(size, dq.desc, dq.avail, dq.used, True), MEM, event_idx=event_idx)
    return dq, vq


def test_direct_and_indirect_chains_parse_the_same() -> None:
    for indirect in (False, True):
        dq, vq = make_queue()
        head = dq.add([b"hdr", b"payload"], [100, 1], indirect=indirect)
        chain = vq.pop(MEM)
        assert isinstance(chain, DescriptorChain)
        assert chain.head == head
        assert chain.read_all(MEM) == b"hdrpayload"
        assert (chain.readable_len, chain.writable_len) == (10, 101)
        assert chain.write(MEM, b"x" * 101) == 101
        vq.add_used(chain.head, 101)
        used = dq.get_used()
        assert [(u.head, u.length) for u in used] == [(head, 101)]
        assert used[0].data == b"x" * 101
        assert vq.pop(MEM) is None


def test_write_at_an_offset_spans_buffers() -> None:
    dq, vq = make_queue()
    dq.add([], [3, 3, 3])
    chain = vq.pop(MEM)
    assert isinstance(chain, DescriptorChain)
    assert chain.write(MEM, b"abcd", offset=2) == 4
    vq.add_used(chain.head, 9)
    assert dq.get_used()[0].data == b"\xee\xeeabcd\xee\xee\xee"


BAD_CHAINS = {
    "loop": [(0x100000, 8, VIRTQ_DESC_F_NEXT, 1), (0x100000, 8, VIRTQ_DESC_F_NEXT, 0)],
    "outside-ram": [(MEM_SIZE - 4, 8, 0, 0)],
    "next-out-of-table": [(0x100000, 8, VIRTQ_DESC_F_NEXT, 99)],
    "read-after-write": [(0x100000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x100000, 8, 0, 0)],
    "indirect-bad-len": [(0x100000, 17, VIRTQ_DESC_F_INDIRECT, 0)],
    "indirect-with-next": [(0x100000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)],
    "indirect-outside": [(MEM_SIZE, 32, VIRTQ_DESC_F_INDIRECT, 0)],
    "huge-length": [(0x100000, 0xFFFFFFFF, 0, 0)],
}


@pytest.mark.parametrize("name", sorted(BAD_CHAINS))
def test_hostile_chains_fail_that_request_only(name: str) -> None:
    dq, vq = make_queue()
    dq.add_raw(BAD_CHAINS[name])
    result = vq.pop(MEM)
    assert isinstance(result, InvalidChain)
    assert result.head == 0
    # The queue keeps working for the next, well-formed chain.
    dq.free = list(range(1, 16))
    dq.add([b"ok"], [])
    assert isinstance(vq.pop(MEM), DescriptorChain)


def test_nested_indirect_tables_are_refused() -> None:
    dq, vq = make_queue()
    inner = 0x200000
    MEM.write(inner, struct.pack("<QIHH", 0x300000, 16, VIRTQ_DESC_F_INDIRECT, 0))
    dq.add_raw([(inner, 16, VIRTQ_DESC_F_INDIRECT, 0)])
    result = vq.pop(MEM)
    assert isinstance(result, InvalidChain) and "nested" in result.reason


def test_indirect_loop_ends() -> None:
    dq, vq = make_queue()
    table = 0x200000
    MEM.write(table, struct.pack("<QIHHQIHH", 0x300000, 8, 1, 1, 0x300000, 8, 1, 0))
    dq.add_raw([(table, 32, VIRTQ_DESC_F_INDIRECT, 0)])
    assert isinstance(vq.pop(MEM), InvalidChain)


def test_avail_index_running_ahead_breaks_the_queue() -> None:
    dq, vq = make_queue(8)
    dq.set_avail_idx(9)
    with pytest.raises(QueueBroken):
        vq.pop(MEM)


def test_head_outside_the_ring_breaks_the_queue() -> None:
    dq, vq = make_queue(8)
    MEM.write_u16(dq.avail + 4, 8)
    dq.set_avail_idx(1)
    with pytest.raises(QueueBroken):
        vq.pop(MEM)


def test_queue_config_checks() -> None:
    ok = QueueConfig(16, 0x10000, 0x11000, 0x12000, True)
    assert check_queue_config(ok, 256, MEM) is None
    assert "power of two" in (check_queue_config(QueueConfig(12, 0x10000, 0x11000, 0x12000), 256, MEM) or "")
    assert "power of two" in (check_queue_config(QueueConfig(512, 0x10000, 0x11000, 0x12000), 256, MEM) or "")
    assert "misaligned" in (check_queue_config(QueueConfig(16, 0x10008, 0x11000, 0x12000), 256, MEM) or "")
    assert "outside" in (check_queue_config(QueueConfig(16, MEM_SIZE - 16, 0x11000, 0x12000), 256, MEM) or "")


def test_vring_need_event_matches_the_spec_formula() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(2, 3, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # wrap-around


def test_event_idx_suppresses_interrupts_until_used_event() -> None:
    dq, vq = make_queue(event_idx=True)
    for _ in range(4):
        dq.add([b"x"], [])
    dq.set_used_event(2)  # the driver wants an interrupt once the third buffer is used
    results = []
    for _ in range(4):
        chain = vq.pop(MEM)
        assert isinstance(chain, DescriptorChain)
        vq.add_used(chain.head, 0)
        results.append(vq.needs_interrupt())
    assert results == [True, False, True, False]


def test_no_interrupt_flag_without_event_idx() -> None:
    dq, vq = make_queue()
    dq.add([b"x"], [])
    chain = vq.pop(MEM)
    assert isinstance(chain, DescriptorChain)
    vq.add_used(chain.head, 0)
    dq.set_no_interrupt(True)
    assert not vq.needs_interrupt()
    dq.set_no_interrupt(False)
    assert vq.needs_interrupt()


def test_notification_control() -> None:
    dq, vq = make_queue(event_idx=True)
    dq.add([b"x"], [])
    vq.pop(MEM)
    vq.set_notification(True)
    assert dq.avail_event() == 1
    dq2, vq2 = make_queue()
    vq2.set_notification(False)
    assert MEM.read_u16(dq2.used) == 1
    vq2.set_notification(True)
    assert MEM.read_u16(dq2.used) == 0


desc = st.tuples(
    st.integers(0, MEM_SIZE + 0x1000),
    st.integers(0, 1 << 20),
    st.integers(0, 7),
    st.integers(0, 20),
)


def _fuzz_chain(descs: list[tuple[int, int, int, int]]) -> None:
    dq, vq = make_queue(16)
    dq.add_raw(descs[:16])
    result = vq.pop(MEM)
    assert isinstance(result, DescriptorChain | InvalidChain)
    if isinstance(result, DescriptorChain):
        assert len(result.descriptors) <= 16 * 1024
        for d in result.descriptors:
            assert MEM.contains(d.addr, d.length) or d.length == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(desc, min_size=1, max_size=16))
def test_fuzz_chain_parsing_never_crashes_or_escapes_ram(descs: list[tuple[int, int, int, int]]) -> None:
    _fuzz_chain(descs)


@pytest.mark.long
@settings(max_examples=100_000, deadline=None)
@given(st.lists(desc, min_size=1, max_size=16))
def test_fuzz_chain_parsing_long(descs: list[tuple[int, int, int, int]]) -> None:
    _fuzz_chain(descs)


def test_an_empty_ring_asks_for_the_next_kick_with_event_idx() -> None:
    """§2.7.10: with EVENT_IDX a driver kicks only when its new index passes avail_event."""
    dq, vq = make_queue(event_idx=True)
    for _ in range(3):
        dq.add([b"x"], [])
    while isinstance(vq.pop(MEM), DescriptorChain):
        pass
    assert dq.avail_event() == 3  # the driver's next buffer (index 3) will be kicked
    vq.set_notification(False)
    dq.add([b"y"], [])
    assert isinstance(vq.pop(MEM), DescriptorChain)
    assert vq.pop(MEM) is None
    assert dq.avail_event() == 3  # not updated while the device does not want kicks


def test_a_head_offered_again_before_it_was_used_breaks_the_queue() -> None:
    """§2.7.13: a buffer is the device's until it is used; acting on a second offer would complete it twice."""
    dq, vq = make_queue()
    head = dq.add([b"frame"], [])
    assert isinstance(vq.pop(MEM), DescriptorChain)
    dq.publish(head)
    with pytest.raises(QueueBroken, match=f"head {head} again"):
        vq.pop(MEM)


def test_a_head_used_then_offered_again_is_fine_and_undo_pop_lets_it_go() -> None:
    dq, vq = make_queue()
    head = dq.add([b"frame"], [])
    chain = vq.pop(MEM)
    assert isinstance(chain, DescriptorChain)
    vq.undo_pop()  # the device found no room: the same chain comes again
    again = vq.pop(MEM)
    assert isinstance(again, DescriptorChain) and again.head == head
    vq.add_used(head, 0)
    dq.publish(head)  # the driver may offer it again once it has it back
    assert isinstance(vq.pop(MEM), DescriptorChain)


def test_completing_a_head_the_device_does_not_hold_is_refused() -> None:
    dq, vq = make_queue()
    head = dq.add([b"frame"], [])
    with pytest.raises(QueueBroken, match="does not hold"):
        vq.add_used(head, 0)
    assert dq.used_idx() == 0  # nothing reached the driver
