"""The per-connection state machine: credit both ways, shutdown, RST (virtio 1.2 §5.10.6.3 - §5.10.6.6)."""

from __future__ import annotations

from evmm.devices.virtio.vsock.connection import BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, Connection, State
from evmm.devices.virtio.vsock.packet import (
    HOST_CID,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    U32,
    Header,
    Op,
)

GUEST = 3
HOST_PORT, GUEST_PORT = 52, 1234


def pkt(op: Op, n: int = 0, *, flags: int = 0, buf_alloc: int = 65536, fwd_cnt: int = 0) -> Header:
    return Header(GUEST, HOST_CID, GUEST_PORT, HOST_PORT, n, TYPE_STREAM, op, flags, buf_alloc, fwd_cnt)


def guest_initiated(buf_alloc: int = 65536) -> Connection:
    c = Connection(GUEST, HOST_PORT, GUEST_PORT, host_initiated=False)
    c.update_peer_credit(pkt(Op.REQUEST, buf_alloc=buf_alloc))
    return c


def controls(c: Connection) -> list[Header]:
    out = []
    while (h := c.take_control()) is not None:
        out.append(h)
    return out


def test_guest_initiated_answers_response_with_our_credit() -> None:
    c = guest_initiated()
    assert not c.can_send_data  # RESPONSE first
    [h] = controls(c)
    assert h.op == Op.RESPONSE
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (HOST_CID, GUEST, HOST_PORT, GUEST_PORT)
    assert (h.buf_alloc, h.fwd_cnt, h.type) == (BUF_ALLOC, 0, TYPE_STREAM)
    assert c.can_send_data and c.credit == 65536


def test_host_initiated_waits_for_response() -> None:
    c = Connection(GUEST, 1 << 30, 52, host_initiated=True)
    assert c.state is State.CONNECTING
    [h] = controls(c)
    assert h.op == Op.REQUEST and h.src_port == 1 << 30 and h.dst_port == 52
    assert c.on_packet(pkt(Op.RW, 3)) is not None  # data before RESPONSE is a violation
    c = Connection(GUEST, 1 << 30, GUEST_PORT, host_initiated=True)
    controls(c)
    assert c.on_packet(pkt(Op.RESPONSE, buf_alloc=4096)) is None
    assert c.state is State.ESTABLISHED and c.credit == 4096


def test_guest_rst_closes_without_answer() -> None:
    c = Connection(GUEST, 1 << 30, GUEST_PORT, host_initiated=True)
    controls(c)
    assert c.on_packet(pkt(Op.RST)) is None
    assert c.state is State.CLOSED and c.take_control() is None


def test_never_more_than_the_guests_credit() -> None:
    c = guest_initiated(buf_alloc=10_000)
    controls(c)
    h = c.data_header(6000)
    assert h.op == Op.RW and h.len == 6000
    assert c.credit == 4000
    c.data_header(4000)
    assert c.credit == 0 and not c.can_send_data
    # Credit exhausted: one CREDIT_REQUEST (§5.10.6.3), not one per attempt.
    assert [h.op for h in controls(c)] == [Op.CREDIT_REQUEST]
    # The guest's application read 7000 bytes and says so.
    c.on_packet(pkt(Op.CREDIT_UPDATE, buf_alloc=10_000, fwd_cnt=7000))
    assert c.credit == 7000 and c.can_send_data


def test_counters_wrap_modulo_2_32() -> None:
    c = guest_initiated(buf_alloc=8192)
    controls(c)
    c.tx_cnt = U32 - 99  # 100 bytes before the wrap
    c.on_packet(pkt(Op.CREDIT_UPDATE, buf_alloc=8192, fwd_cnt=U32 - 99))
    c.data_header(4096)
    assert c.tx_cnt == 4096 - 100
    assert c.credit == 4096
    c.on_packet(pkt(Op.CREDIT_UPDATE, buf_alloc=8192, fwd_cnt=4096 - 100))
    assert c.credit == 8192


def test_guest_data_within_our_credit_then_beyond() -> None:
    c = guest_initiated()
    controls(c)
    assert c.on_packet(pkt(Op.RW, 4096)) is None
    assert c.rx_cnt == 4096
    c.to_host += b"x" * (BUF_ALLOC - 100)  # the host socket is not reading
    why = c.on_packet(pkt(Op.RW, 101))
    assert why is not None and "credit" in why


def test_credit_update_when_the_guest_believes_we_are_nearly_full() -> None:
    c = guest_initiated()
    controls(c)
    sent = BUF_ALLOC - CREDIT_UPDATE_THRESHOLD // 2
    c.on_packet(pkt(Op.RW, sent))
    c.forwarded(1000)
    [h] = controls(c)
    assert h.op == Op.CREDIT_UPDATE and h.fwd_cnt == 1000 and h.buf_alloc == BUF_ALLOC
    # Plenty of room as far as the guest knows: no update for more forwarded bytes.
    c.forwarded(sent - 1000)
    assert [h.op for h in controls(c)] == [Op.CREDIT_UPDATE]  # still below threshold until told
    c.on_packet(pkt(Op.RW, 100))
    c.forwarded(100)
    assert controls(c) == []


def test_data_carries_fwd_cnt_so_a_pending_update_is_dropped() -> None:
    c = guest_initiated()
    controls(c)
    c.on_packet(pkt(Op.RW, BUF_ALLOC - 10))
    c.forwarded(BUF_ALLOC - 10)
    assert c.has_control
    h = c.data_header(10)
    assert h.fwd_cnt == BUF_ALLOC - 10
    assert controls(c) == []


def test_credit_request_is_always_answered() -> None:
    c = guest_initiated()
    controls(c)
    c.on_packet(pkt(Op.CREDIT_REQUEST))
    [h] = controls(c)
    assert h.op == Op.CREDIT_UPDATE


def test_host_half_close_then_guest_close() -> None:
    c = guest_initiated()
    controls(c)
    c.host_eof()
    assert not c.can_send_data
    [h] = controls(c)
    assert h.op == Op.SHUTDOWN and h.flags == SHUTDOWN_SEND
    assert not c.finished
    # The guest may still send; the host still reads.
    assert c.on_packet(pkt(Op.RW, 10)) is None
    c.to_host += b"0123456789"
    c.on_packet(pkt(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert not c.finished  # 10 bytes still owed to the host
    c.to_host.clear()
    assert c.finished
    c.finish()
    [h] = controls(c)
    assert h.op == Op.RST and c.state is State.CLOSED


def test_guest_half_close() -> None:
    c = guest_initiated()
    controls(c)
    c.on_packet(pkt(Op.SHUTDOWN, flags=SHUTDOWN_SEND))
    assert c.guest_done_sending and not c.finished
    assert c.can_send_data  # the host may still send to the guest
    why = c.on_packet(pkt(Op.RW, 1))
    assert why is not None and "shut" in why
    c2 = guest_initiated()
    controls(c2)
    c2.on_packet(pkt(Op.SHUTDOWN, flags=SHUTDOWN_RCV))
    assert not c2.can_send_data and not c2.guest_done_sending


def test_host_full_close_is_shutdown_then_rst() -> None:
    c = guest_initiated()
    controls(c)
    c.to_host += b"lost"
    c.host_closed()
    [h] = controls(c)
    assert h.op == Op.SHUTDOWN and h.flags == SHUTDOWN_BOTH
    assert c.finished and not c.to_host
    c.finish()
    assert [h.op for h in controls(c)] == [Op.RST]


def test_reset_replaces_everything_with_one_rst() -> None:
    c = guest_initiated()
    c.host_eof()
    c.reset("broken")
    assert (c.state, c.reset_reason) == (State.RESETTING, "broken")
    [h] = controls(c)
    assert h.op == Op.RST and h.src_port == HOST_PORT and h.dst_port == GUEST_PORT
    assert c.state == State.CLOSED
    c.reset("again")  # idempotent
    assert controls(c) == []


def test_protocol_violations() -> None:
    c = guest_initiated()
    controls(c)
    assert c.on_packet(pkt(Op.REQUEST)) is not None
    assert c.on_packet(pkt(Op.RESPONSE)) is not None
