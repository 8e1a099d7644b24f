"""The virtio-net packet header (virtio 1.2 §5.1.6) and what each direction must check of it.  Pure: no I/O.

With VIRTIO_F_VERSION_1 the header is always the 12-byte ``virtio_net_hdr`` with ``num_buffers``, whether or not
VIRTIO_NET_F_MRG_RXBUF is negotiated (§5.1.6.1: only legacy drivers used the 10-byte form).  A Linux tap set up
with IFF_VNET_HDR and TUNSETVNETHDRSZ 12 reads and writes the very same layout (include/linux/virtio_net.h), so a
frame crosses between guest and tap with its header checked, never translated.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HDR_LEN = 12
ETH_HLEN = 14  # the smallest frame a tap accepts is an Ethernet header
VLAN_HLEN = 4
# §5.1.6.3: the largest incoming packet with TSO/UFO is 14 (Ethernet) + 40 (IPv6) + 65535 (payload) bytes.
MAX_FRAME = 65589
_HDR = struct.Struct("<BBHHHHH")

# flags (§5.1.6)
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
F_RSC_INFO = 4

# gso_type (§5.1.6)
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

# Feature bits (§5.1.3).
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_GUEST_UFO = 1 << 10
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_HOST_UFO = 1 << 14
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17

# Which feature lets each gso_type through, per direction (§5.1.6.2 driver, §5.1.6.4 device requirements).
_TX_GSO = {
    GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
    GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
    GSO_UDP: VIRTIO_NET_F_HOST_UFO,
}
_RX_GSO = {
    GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4,
    GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6,
    GSO_UDP: VIRTIO_NET_F_GUEST_UFO,
}


class NetHeader(NamedTuple):
    """struct virtio_net_hdr (§5.1.6); a NamedTuple, as it is made for every frame on the data path."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> NetHeader:
        """The header at the start of ``data``, which must hold at least HDR_LEN bytes."""
        if len(data) < HDR_LEN:
            raise ValueError(f"a virtio-net header is {HDR_LEN} bytes, got {len(data)}")
        return cls._make(_HDR.unpack_from(data, 0))

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _HDR.pack_into(buf, offset, *self)


def _check_gso(hdr: NetHeader, features: int, allowed: dict[int, int], ecn: int) -> str | None:
    kind = hdr.gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        return None if not hdr.gso_type & GSO_ECN else "the ECN bit is set without a GSO type"
    need = allowed.get(kind)
    if need is None or not features & need:
        return f"gso_type {hdr.gso_type:#x} was not negotiated"
    if hdr.gso_type & GSO_ECN and not features & ecn:
        return "GSO with ECN was not negotiated"
    if not hdr.flags & F_NEEDS_CSUM:
        return "a GSO frame without NEEDS_CSUM"
    if hdr.gso_size == 0:
        return "a GSO frame with gso_size 0"
    return None


def _check_csum(hdr: NetHeader, frame_len: int) -> str | None:
    # The checksum field (2 bytes at csum_start + csum_offset) must lie inside the frame.
    if hdr.flags & F_NEEDS_CSUM and hdr.csum_start + hdr.csum_offset + 2 > frame_len:
        return f"checksum at {hdr.csum_start}+{hdr.csum_offset} lies outside a {frame_len}-byte frame"
    return None


def check_tx(hdr: NetHeader, frame_len: int, features: int) -> str | None:
    """Why a frame the driver sent must be dropped, or None (§5.1.6.2 driver requirements).

    ``frame_len`` counts the Ethernet frame after the header.  The tap checks again in the kernel
    (virtio_net_hdr_to_skb); checking here names the reason and keeps the count.
    """
    if frame_len < ETH_HLEN:
        return f"a {frame_len}-byte frame is shorter than an Ethernet header"
    if hdr.flags & F_NEEDS_CSUM and not features & VIRTIO_NET_F_CSUM:
        return "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
    return _check_gso(hdr, features, _TX_GSO, VIRTIO_NET_F_HOST_ECN) or _check_csum(hdr, frame_len)


def tap_tx_header(hdr: NetHeader) -> bytes:
    """The header handed to the tap: only the flag bit it acts on (§5.1.6.2: the device ignores bits it does
    not recognise; DATA_VALID and RSC_INFO are not the driver's to set), num_buffers zero."""
    return _HDR.pack(
        hdr.flags & F_NEEDS_CSUM, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, 0
    )


def check_rx(hdr: NetHeader, frame_len: int, features: int, mtu: int | None = None) -> str | None:
    """Why a frame read from the tap cannot go to this driver, or None (§5.1.6.4 device requirements).

    TUNSETOFFLOAD already keeps the kernel from handing us offloads the driver did not accept; this catches
    frames queued before the driver renegotiated, and anything the host sends beyond the negotiated ``mtu``.
    """
    if frame_len < ETH_HLEN:
        return f"a {frame_len}-byte frame is shorter than an Ethernet header"
    if hdr.flags & F_NEEDS_CSUM and not features & VIRTIO_NET_F_GUEST_CSUM:
        return "a partially checksummed frame, and the driver did not negotiate VIRTIO_NET_F_GUEST_CSUM"
    why = _check_gso(hdr, features, _RX_GSO, VIRTIO_NET_F_GUEST_ECN)
    if why is not None:
        return why
    if hdr.gso_type & ~GSO_ECN == GSO_NONE and mtu is not None and frame_len > mtu + ETH_HLEN + VLAN_HLEN:
        return f"a {frame_len}-byte frame exceeds the negotiated MTU {mtu}"
    return _check_csum(hdr, frame_len)


def rx_header(hdr: NetHeader, features: int, num_buffers: int) -> NetHeader:
    """The header the driver gets: flags it may see, and the buffer count (§5.1.6.4 device requirements)."""
    flags = hdr.flags & (F_NEEDS_CSUM | F_DATA_VALID) if features & VIRTIO_NET_F_GUEST_CSUM else 0
    return hdr._replace(flags=flags, num_buffers=num_buffers)


def set_num_buffers(buf: bytearray | memoryview, count: int) -> None:
    """Patch num_buffers of a header already in ``buf`` (once the device knows how many chains it used)."""
    struct.pack_into("<H", buf, 10, count)


__all__ = [
    "ETH_HLEN",
    "HDR_LEN",
    "MAX_FRAME",
    "NetHeader",
    "check_rx",
    "check_tx",
    "rx_header",
    "set_num_buffers",
    "tap_tx_header",
]
