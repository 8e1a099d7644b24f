"""One vsock stream connection as a state machine with no I/O (virtio 1.2 §5.10.6.3 - §5.10.6.6).

A connection is named by (host port, guest port).  It keeps the credit accounting both ways:

* guest -> host: we advertise ``buf_alloc`` and ``fwd_cnt`` (bytes handed on to the host socket).  Bytes the
  guest sent that the host socket has not taken yet wait in ``to_host``; a guest within its credit can never
  make that exceed ``buf_alloc``, so a packet that would is a protocol violation and resets the connection.
* host -> guest: the guest advertises its own ``buf_alloc``/``fwd_cnt`` in every packet; ``credit`` is how
  many more bytes we may send (§5.10.6.3: buf_alloc - (tx_cnt - fwd_cnt), counters modulo 2**32).

The muxer feeds it the guest's packets and what happened on the host socket, and asks it for the control
packets to send (``take_control``) and for the header of each data packet (``data_header``).
"""

from __future__ import annotations

from enum import Enum

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

# What we advertise per connection (the same as Linux's default, VIRTIO_VSOCK_DEFAULT_BUF_SIZE).
BUF_ALLOC = 256 * 1024
# Tell the guest about freed space once the space it believes we have falls below this.
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4

# Control packets in the order they go out: the handshake first, an RST last.
_CONTROL_ORDER = (Op.REQUEST, Op.RESPONSE, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST, Op.SHUTDOWN, Op.RST)


class State(Enum):
    CONNECTING = "connecting"  # host-initiated: REQUEST sent or queued, waiting for the guest's RESPONSE
    ESTABLISHED = "established"
    RESETTING = "resetting"  # an RST is queued for the guest; forgotten once it is sent
    CLOSED = "closed"  # nothing more to do; the muxer forgets it


class Connection:
    def __init__(
        self,
        guest_cid: int,
        local_port: int,
        peer_port: int,
        *,
        host_initiated: bool,
        buf_alloc: int = BUF_ALLOC,
    ) -> None:
        self.guest_cid = guest_cid
        self.local_port = local_port  # the host's port
        self.peer_port = peer_port  # the guest's port
        self.buf_alloc = buf_alloc
        self.state = State.CONNECTING if host_initiated else State.ESTABLISHED
        self._pending: set[Op] = {Op.REQUEST if host_initiated else Op.RESPONSE}
        self._answer_credit_request = False
        # guest -> host
        self.rx_cnt = 0  # payload bytes received from the guest (mod 2**32)
        self.fwd_cnt = 0  # of those, bytes the host socket has taken (mod 2**32)
        self._fwd_cnt_told = 0  # fwd_cnt in the last header the guest was sent
        self.to_host = bytearray()
        # host -> guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # payload bytes sent to the guest (mod 2**32)
        self._credit_requested = False
        # shutdown flags (§5.10.6.5): what the guest told us, and what we told it
        self.peer_shutdown = 0
        self.local_shutdown = 0
        self._shutdown_to_send = 0
        self.reset_reason = ""

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    # ---- host -> guest credit ------------------------------------------------------------------------------

    @property
    def credit(self) -> int:
        """Payload bytes we may send the guest now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(self.peer_buf_alloc - in_flight, 0)

    @property
    def can_send_data(self) -> bool:
        """Whether reading the host socket for the guest makes sense now."""
        return (
            self.state is State.ESTABLISHED
            and not self._pending & {Op.REQUEST, Op.RESPONSE}
            and not (self.local_shutdown | self._shutdown_to_send) & SHUTDOWN_SEND
            and not self.peer_shutdown & SHUTDOWN_RCV
            and self.credit > 0
        )

    def update_peer_credit(self, hdr: Header) -> None:
        """§5.10.6.3: every packet carries its sender's current buffer space."""
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        if self.credit > 0:
            self._credit_requested = False

    def data_header(self, n: int) -> Header:
        """The header for ``n`` payload bytes about to go to the guest; accounts them as sent."""
        assert 0 < n <= self.credit
        self.tx_cnt = (self.tx_cnt + n) & U32
        if self.credit == 0 and not self._credit_requested:
            # §5.10.6.3: ask for an update rather than wait on a guest that may never send one.
            self._credit_requested = True
            self._pending.add(Op.CREDIT_REQUEST)
        return self._header(Op.RW, n)

    # ---- events from the guest -----------------------------------------------------------------------------

    def on_packet(self, hdr: Header) -> str | None:
        """Take a guest packet for this connection; returns why it violates the protocol (reset), or None.

        For RW, only the accounting happens here: the caller forwards or buffers the payload afterwards.
        """
        if self.state in (State.RESETTING, State.CLOSED):
            return None
        if hdr.op == Op.RST:
            # §5.10.6.4: the guest tore the connection down; nothing is answered.
            self.state = State.CLOSED
            self.to_host.clear()
            return None
        self.update_peer_credit(hdr)
        if hdr.op == Op.REQUEST:
            return "REQUEST on a connection that already exists"
        if self.state is State.CONNECTING:
            if hdr.op != Op.RESPONSE:
                return f"{Op(hdr.op).name} before the guest answered the connection request"
            self.state = State.ESTABLISHED
            return None
        if hdr.op == Op.RESPONSE:
            return "RESPONSE on an established connection"
        if hdr.op == Op.SHUTDOWN:
            self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH
            if hdr.flags & SHUTDOWN_RCV:
                self._pending.discard(Op.CREDIT_REQUEST)
        elif hdr.op == Op.CREDIT_REQUEST:
            self._answer_credit_request = True
            self._pending.add(Op.CREDIT_UPDATE)
        elif hdr.op == Op.RW:
            if self.peer_shutdown & SHUTDOWN_SEND:
                return "data after the guest shut its sending side down"
            if len(self.to_host) + hdr.len > self.buf_alloc:
                return f"{hdr.len} bytes beyond the credit given ({self.buf_alloc - len(self.to_host)} left)"
            self.rx_cnt = (self.rx_cnt + hdr.len) & U32
        return None

    # ---- events from the host socket -----------------------------------------------------------------------

    def forwarded(self, n: int) -> None:
        """``n`` bytes of guest data reached the host socket: the guest may have that space back."""
        self.fwd_cnt = (self.fwd_cnt + n) & U32
        told_free = self.buf_alloc - ((self.rx_cnt - self._fwd_cnt_told) & U32)
        if told_free < CREDIT_UPDATE_THRESHOLD and self.state is State.ESTABLISHED:
            self._pending.add(Op.CREDIT_UPDATE)

    def host_eof(self) -> None:
        """The host side will send no more: tell the guest with SHUTDOWN(SEND) after the data already sent."""
        self._shutdown(SHUTDOWN_SEND)

    def host_closed(self) -> None:
        """The host socket is closed both ways: SHUTDOWN(RCV|SEND), then an RST once that is sent."""
        self.to_host.clear()
        self._shutdown(SHUTDOWN_BOTH)

    def _shutdown(self, flags: int) -> None:
        if self.state is not State.ESTABLISHED:
            return
        new = flags & ~(self.local_shutdown | self._shutdown_to_send)
        if new:
            self._shutdown_to_send |= new
            self._pending.add(Op.SHUTDOWN)

    def reset(self, reason: str) -> None:
        """Abort: an RST goes to the guest, nothing else does; buffered data is dropped."""
        if self.state in (State.RESETTING, State.CLOSED):
            return
        self.reset_reason = reason
        self.state = State.RESETTING
        self._pending = {Op.RST}
        self.to_host.clear()

    # ---- what to do next -----------------------------------------------------------------------------------

    @property
    def guest_done_sending(self) -> bool:
        """The guest sent SHUTDOWN(SEND) and everything it sent has reached the host socket."""
        return bool(self.peer_shutdown & SHUTDOWN_SEND) and not self.to_host

    @property
    def finished(self) -> bool:
        """Both directions are shut down (and the guest's data drained): time for the closing RST.

        §5.10.6.5: after SHUTDOWN with both flags the peer answers with RST; Linux waits for it before it
        forgets a closed socket.  When the host side closed first we send SHUTDOWN(RCV|SEND) and then the RST
        ourselves, so the guest never waits on a timeout.
        """
        if self.state is not State.ESTABLISHED:
            return False
        if self.peer_shutdown == SHUTDOWN_BOTH:
            return not self.to_host
        return self.local_shutdown == SHUTDOWN_BOTH

    def finish(self) -> None:
        """Close cleanly: the closing RST goes out, and the connection is forgotten."""
        if self.state is State.ESTABLISHED:
            self.state = State.RESETTING
            self._pending = {Op.RST}

    @property
    def has_control(self) -> bool:
        return bool(self._pending)

    def take_control(self) -> Header | None:
        """The next control packet to put on the RX queue, if any."""
        while self._pending:
            op = next(o for o in _CONTROL_ORDER if o in self._pending)
            self._pending.discard(op)
            if op == Op.RST:
                self.state = State.CLOSED
                return self._header(Op.RST, 0)
            if op == Op.SHUTDOWN:
                flags, self._shutdown_to_send = self._shutdown_to_send, 0
                self.local_shutdown |= flags
                return self._header(Op.SHUTDOWN, 0, flags)
            if op == Op.CREDIT_UPDATE:
                answer, self._answer_credit_request = self._answer_credit_request, False
                if not answer and self.fwd_cnt == self._fwd_cnt_told:
                    continue  # a data packet already carried the news
            return self._header(op, 0)
        return None

    def _header(self, op: Op, n: int, flags: int = 0) -> Header:
        self._fwd_cnt_told = self.fwd_cnt
        return Header(
            src_cid=HOST_CID,
            dst_cid=self.guest_cid,
            src_port=self.local_port,
            dst_port=self.peer_port,
            len=n,
            type=TYPE_STREAM,
            op=op,
            flags=flags,
            buf_alloc=self.buf_alloc,
            fwd_cnt=self.fwd_cnt,
        )


__all__ = ["BUF_ALLOC", "CREDIT_UPDATE_THRESHOLD", "Connection", "State"]
