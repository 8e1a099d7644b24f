"""evmm-oci's network plumbing (evmm/oci/network.py) for real, in the KVM test host: a veth in a namespace of
the test's, a tap made next to it and joined by the tc redirect both ways, then attached to by name as the VMM does
(evmm's open_tap); a frame sent from the veth's far end comes out of the tap (where a guest would read it),
and a frame written into the tap (a guest's) comes out at the far end; unplumb leaves nothing.  No VM: this is the host half of carrying a container's network into one."""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from evmm.devices.virtio.net.tap import open_tap
from evmm.netns import inside, ip, netns, unavailable
from evmm.oci import network

ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental: nothing else on the link uses it
VNET_HDR = 12  # the tap's virtio-net header (evmm opens it with IFF_VNET_HDR, 12-byte headers)
PACKET_OUTGOING = 4

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


def mac_bytes(mac: str) -> bytes:
    return bytes(int(b, 16) for b in mac.split(":"))


def read_tap(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([fd], [], [], 0.2)
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if marker in data:
            return data[VNET_HDR:]
    raise AssertionError(f"no frame with {marker!r} came out of the tap in {timeout:g} s")


def read_socket(s: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    s.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(65536)
        except TimeoutError:
            continue
        if marker in data and addr[2] != PACKET_OUTGOING:
            return data
    raise AssertionError(f"no frame with {marker!r} reached the veth's peer in {timeout:g} s")


def test_the_tap_stands_in_for_the_veth() -> None:
    with netns("evmm-oci") as ns:
        ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        ip("-n", ns, "addr", "add", "10.99.0.2/24", "dev", "eth0")
        for dev in ("eth0", "peer0"):
            ip("-n", ns, "link", "set", dev, "up")
        with inside(ns):
            [veth] = network.parse_interfaces(network.run(["ip", "-j", "addr", "show", "dev", "eth0"]))
            assert veth.addresses == ("10.99.0.2/24",)
            network.plumb(veth)
            tap = open_tap(network.TAP)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
            try:
                sock.bind(("peer0", 0))
                peer_mac = sock.getsockname()[4][:6]
                inbound = mac_bytes(veth.mac) + peer_mac + ETHERTYPE + b"to-the-guest".ljust(46, b".")
                sock.send(inbound)
                assert read_tap(tap.fd, b"to-the-guest") == inbound
                outbound = peer_mac + mac_bytes(veth.mac) + ETHERTYPE + b"from-the-guest".ljust(46, b".")
                os.write(tap.fd, bytes(VNET_HDR) + outbound)
                assert read_socket(sock, b"from-the-guest") == outbound
            finally:
                sock.close()
                tap.close()
            network.unplumb("eth0")
            assert "ingress" not in network.run(["tc", "qdisc", "show", "dev", "eth0"])
            assert network.TAP not in network.run(["ip", "link", "show"])
