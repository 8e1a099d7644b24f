"""The virtio-vsock packet header (virtio 1.2 §5.10.6), parsed and checked with no I/O.

Every packet on the RX and TX queues starts with the 44-byte little-endian ``virtio_vsock_hdr``; a stream
payload of ``len`` bytes follows it (§5.10.6.1).  Parsing never raises: a buffer too short for a header is
``None``, and ``check_tx`` says why a guest packet cannot be taken, and whether it deserves an RST answer.
"""

from __future__ import annotations

import struct
from dataclasses import replace
from enum import IntEnum

from evmm.record import record

# struct virtio_vsock_hdr (§5.10.6): src_cid, dst_cid (le64); src_port, dst_port, len (le32); type, op (le16);
# flags, buf_alloc, fwd_cnt (le32).  Packed: 44 bytes.
_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size
assert HDR_SIZE == 44

# Well-known CIDs (§5.10.4): 2 is the host; the guest's own comes from the config space.
HOST_CID = 2

TYPE_STREAM = 1  # §5.10.6: VIRTIO_VSOCK_TYPE_STREAM; SEQPACKET (2) is not offered

# SHUTDOWN flags (§5.10.6.5): the sender will receive no more / send no more.
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

# The largest payload evmm accepts in one packet; Linux sends at most 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
MAX_PAYLOAD = 64 * 1024

U32 = 0xFFFFFFFF


class Op(IntEnum):
    """Packet operations (§5.10.6)."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


_OPS = frozenset(int(op) for op in Op)


@record(frozen=True, slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int  # an ``Op`` when valid; kept as int so a hostile value survives parsing
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    def pack(self) -> bytes:
        return _HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    def with_len(self, n: int) -> Header:
        return replace(self, len=n)


def parse_header(data: bytes | bytearray | memoryview) -> Header | None:
    """The header at the start of ``data``, or None when ``data`` is shorter than a header."""
    if len(data) < HDR_SIZE:
        return None
    return Header(*_HDR.unpack_from(data, 0))


@record(frozen=True, slots=True)
class Rejection:
    """Why a guest packet was not taken; ``reset`` asks for an RST to its sender (§5.10.6.2)."""

    reason: str
    reset: bool


def check_tx(hdr: Header, payload_len: int, guest_cid: int) -> Rejection | None:
    """Whether a packet the guest put on the TX queue can be taken, given the payload bytes that follow it.

    A wrong source CID is spoofing and is dropped silently; an RST is never answered (that could loop, as the
    spec warns in §5.10.6.2); everything else that names a connection gets an RST so the guest's socket fails
    quickly instead of waiting for a timeout.
    """
    if hdr.src_cid != guest_cid:
        return Rejection(f"source CID {hdr.src_cid} is not the guest's CID {guest_cid}", reset=False)
    answer = hdr.op != Op.RST
    if hdr.dst_cid != HOST_CID:
        return Rejection(f"destination CID {hdr.dst_cid} is not the host (CID {HOST_CID})", reset=answer)
    if hdr.type != TYPE_STREAM:
        return Rejection(f"socket type {hdr.type} is not STREAM", reset=answer)
    if hdr.op not in _OPS:
        return Rejection(f"unknown operation {hdr.op}", reset=answer)
    if hdr.op == Op.RW:
        if hdr.len > payload_len:
            return Rejection(f"len {hdr.len} is beyond the {payload_len} payload bytes given", reset=answer)
        if hdr.len > MAX_PAYLOAD:
            return Rejection(f"len {hdr.len} is larger than {MAX_PAYLOAD}", reset=answer)
    return None


def reply_header(to: Header, op: Op, *, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0) -> Header:
    """A header from the host answering ``to`` (addresses swapped), with no payload."""
    return Header(
        src_cid=to.dst_cid,
        dst_cid=to.src_cid,
        src_port=to.dst_port,
        dst_port=to.src_port,
        len=0,
        type=TYPE_STREAM,
        op=op,
        flags=flags,
        buf_alloc=buf_alloc,
        fwd_cnt=fwd_cnt,
    )


__all__ = [
    "HDR_SIZE",
    "HOST_CID",
    "MAX_PAYLOAD",
    "SHUTDOWN_BOTH",
    "SHUTDOWN_RCV",
    "SHUTDOWN_SEND",
    "TYPE_STREAM",
    "Header",
    "Op",
    "Rejection",
    "check_tx",
    "parse_header",
    "reply_header",
]
