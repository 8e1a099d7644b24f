"""The virtio-net header (virtio 1.2 §5.1.6): layout, the checks of each direction, and the tap offload map."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, tap_offloads

TX_ALL = h.VIRTIO_NET_F_CSUM | h.VIRTIO_NET_F_HOST_TSO4 | h.VIRTIO_NET_F_HOST_TSO6 | h.VIRTIO_NET_F_HOST_ECN
RX_ALL = (
    h.VIRTIO_NET_F_GUEST_CSUM
    | h.VIRTIO_NET_F_GUEST_TSO4
    | h.VIRTIO_NET_F_GUEST_TSO6
    | h.VIRTIO_NET_F_GUEST_ECN
)
TSO4 = h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 54, 1448, 34, 16)


def test_layout_is_the_version_1_header() -> None:
    raw = bytes([1, 4]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little")
    raw += (34).to_bytes(2, "little") + (16).to_bytes(2, "little") + (3).to_bytes(2, "little")
    hdr = h.NetHeader.parse(raw + b"frame bytes follow")
    assert hdr == h.NetHeader(1, 4, 54, 1448, 34, 16, 3)
    assert hdr.pack() == raw and h.HDR_LEN == len(raw) == 12
    buf = bytearray(16)
    hdr.pack_into(buf, 2)
    assert bytes(buf[2:14]) == raw
    h.set_num_buffers(buf, 9)
    assert buf[10] == 9


def test_a_short_header_is_refused() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        h.NetHeader.parse(b"\0" * 10)


@pytest.mark.parametrize(
    ("hdr", "frame_len", "features", "reason"),
    [
        (h.NetHeader(), 13, TX_ALL, "shorter than an Ethernet header"),
        (h.NetHeader(h.F_NEEDS_CSUM, 0, 0, 0, 34, 16), 100, 0, "without VIRTIO_NET_F_CSUM"),
        (TSO4, 3000, h.VIRTIO_NET_F_CSUM, "not negotiated"),
        (h.NetHeader(0, h.GSO_TCPV4, 54, 1448), 3000, TX_ALL, "without NEEDS_CSUM"),
        (h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV6, 74, 0, 54, 16), 3000, TX_ALL, "gso_size 0"),
        (h.NetHeader(h.F_NEEDS_CSUM, h.GSO_UDP, 42, 1000, 34, 6), 3000, TX_ALL, "not negotiated"),
        (h.NetHeader(h.F_NEEDS_CSUM, h.GSO_UDP_L4, 42, 1000, 34, 6), 3000, TX_ALL, "not negotiated"),
        (
            h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4 | h.GSO_ECN, 54, 1448, 34, 16),
            3000,
            TX_ALL & ~h.VIRTIO_NET_F_HOST_ECN,
            "ECN",
        ),
        (h.NetHeader(0, h.GSO_ECN), 100, TX_ALL, "ECN bit"),
        (h.NetHeader(h.F_NEEDS_CSUM, 0, 0, 0, 90, 16), 100, TX_ALL, "outside"),
    ],
)
def test_tx_refusals(hdr: h.NetHeader, frame_len: int, features: int, reason: str) -> None:
    why = h.check_tx(hdr, frame_len, features)
    assert why is not None and reason in why


@pytest.mark.parametrize(
    ("hdr", "features"),
    [
        (h.NetHeader(), 0),
        (h.NetHeader(h.F_NEEDS_CSUM, 0, 0, 0, 34, 16), h.VIRTIO_NET_F_CSUM),
        (TSO4, TX_ALL),
        (h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV6 | h.GSO_ECN, 74, 1428, 54, 16), TX_ALL),
        (h.NetHeader(h.F_DATA_VALID | 0x80, num_buffers=5), 0),  # unknown bits are ignored (§5.1.6.2.2)
    ],
)
def test_tx_acceptances(hdr: h.NetHeader, features: int) -> None:
    assert h.check_tx(hdr, 3000, features) is None


def test_the_tap_gets_only_what_it_acts_on() -> None:
    hdr = h.NetHeader(h.F_NEEDS_CSUM | h.F_DATA_VALID | h.F_RSC_INFO, h.GSO_TCPV4, 54, 1448, 34, 16, 7)
    assert h.NetHeader.parse(h.tap_tx_header(hdr)) == h.NetHeader(
        h.F_NEEDS_CSUM, h.GSO_TCPV4, 54, 1448, 34, 16
    )


@pytest.mark.parametrize(
    ("hdr", "features", "mtu", "reason"),
    [
        (h.NetHeader(h.F_NEEDS_CSUM, 0, 0, 0, 34, 16), 0, None, "GUEST_CSUM"),
        (TSO4, h.VIRTIO_NET_F_GUEST_CSUM, None, "not negotiated"),
        (h.NetHeader(h.F_NEEDS_CSUM, h.GSO_UDP, 42, 1000, 34, 6), RX_ALL, None, "not negotiated"),
        (
            h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4 | h.GSO_ECN, 54, 1448, 34, 16),
            RX_ALL & ~h.VIRTIO_NET_F_GUEST_ECN,
            None,
            "ECN",
        ),
        (h.NetHeader(), 0, 1500, "MTU"),
    ],
)
def test_rx_refusals(hdr: h.NetHeader, features: int, mtu: int | None, reason: str) -> None:
    why = h.check_rx(hdr, 3000, features, mtu)
    assert why is not None and reason in why


def test_rx_mtu_counts_the_ethernet_header_and_a_vlan_tag() -> None:
    assert h.check_rx(h.NetHeader(), 1518, 0, 1500) is None
    assert h.check_rx(h.NetHeader(), 1519, 0, 1500) is not None
    assert h.check_rx(TSO4, 60000, RX_ALL, 1500) is None  # a TSO frame is not bound by the MTU


def test_rx_header_shows_the_driver_only_its_flags() -> None:
    hdr = h.NetHeader(h.F_NEEDS_CSUM | h.F_DATA_VALID | h.F_RSC_INFO, 0, 0, 0, 34, 16, 0)
    assert h.rx_header(hdr, 0, 1).flags == 0  # §5.1.6.4.1: flags zero without GUEST_CSUM
    with_csum = h.rx_header(hdr, h.VIRTIO_NET_F_GUEST_CSUM, 4)
    assert with_csum.flags == h.F_NEEDS_CSUM | h.F_DATA_VALID and with_csum.num_buffers == 4


@pytest.mark.parametrize(
    ("features", "flags"),
    [
        (0, 0),
        (h.VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
        (RX_ALL, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN),
        (h.VIRTIO_NET_F_GUEST_CSUM | h.VIRTIO_NET_F_GUEST_TSO6, TUN_F_CSUM | TUN_F_TSO6),
        (h.VIRTIO_NET_F_GUEST_CSUM | h.VIRTIO_NET_F_GUEST_ECN, TUN_F_CSUM),  # ECN without TSO means nothing
        (h.VIRTIO_NET_F_GUEST_TSO4 | TX_ALL, 0),  # host-side features say nothing of what the guest takes
    ],
)
def test_tap_offloads(features: int, flags: int) -> None:
    assert tap_offloads(features) == flags


headers = st.builds(
    h.NetHeader,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=2000)
@given(st.binary(min_size=12, max_size=12), st.integers(0, 70000), st.integers(0, (1 << 64) - 1))
def test_checks_never_raise_and_what_passes_is_sound(raw: bytes, frame_len: int, features: int) -> None:
    hdr = h.NetHeader.parse(raw)
    assert hdr.pack() == raw
    for check in (h.check_tx, h.check_rx):
        if check(hdr, frame_len, features) is None:
            assert frame_len >= h.ETH_HLEN
            if hdr.flags & h.F_NEEDS_CSUM:
                assert hdr.csum_start + hdr.csum_offset + 2 <= frame_len
            if hdr.gso_type & ~h.GSO_ECN:
                assert hdr.flags & h.F_NEEDS_CSUM and hdr.gso_size > 0


@given(headers, st.integers(0, (1 << 64) - 1), st.integers(1, 0xFFFF))
def test_rx_header_roundtrips(hdr: h.NetHeader, features: int, count: int) -> None:
    out = h.NetHeader.parse(h.rx_header(hdr, features, count).pack())
    assert out.num_buffers == count and not out.flags & ~(h.F_NEEDS_CSUM | h.F_DATA_VALID)
