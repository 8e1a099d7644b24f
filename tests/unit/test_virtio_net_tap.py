"""A real tap (/dev/net/tun) in a network namespace of the test's own: opening, attaching, the one-line errors,
and virtio-net end to end against the host kernel's network stack (ARP, ICMP, UDP with checksum offload).

Needs root (CAP_NET_ADMIN), /dev/net/tun and iproute2; skipped with the reason where any is missing.  Every
namespace is deleted when its test ends, whatever the outcome, and the taps in it go with it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.config.devspec import NetSpec
from evmm.confine.ioctls import TUNGETIFF, TUNSETIFF
from evmm.devices.virtio.net import VhostNet, VirtioNet, make_net
from evmm.devices.virtio.net import header as h
from evmm.devices.virtio.net.tap import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    open_tap,
    wrap_tap_fd,
)
from evmm.errors import ConfigError
from evmm.netns import inet_checksum, inside, ip, unavailable
from evmm.netns import netns as evmm_netns
from tests.fakes.vhost import FakeVhostNet
from tests.fakes.virtio_driver import MmioDriver, Used

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags

HOST_IP = bytes([10, 77, 0, 1])
GUEST_IP = bytes([10, 77, 0, 2])
BROADCAST = b"\xff" * 6


pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


@pytest.fixture
def netns() -> Iterator[str]:
    with evmm_netns("evmm-ut", ipv6=False) as name:
        yield name


def in_ns_error(ns: str, code: str) -> str:
    """Run ``code`` with ``ip netns exec`` (which also gives it the namespace's /sys); the ConfigError it prints."""
    script = (
        f"from evmm.errors import ConfigError\ntry:\n    {code}\nexcept ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ---- opening and attaching --------------------------------------------------------------------------------


def test_open_creates_a_tap_that_goes_away_with_it(netns: str) -> None:
    with inside(netns):
        tap = open_tap("evt0")
        assert tap.name == "evt0" and tap.mtu() == 1500
        assert not os.get_blocking(tap.fd)
    assert "evt0" in ip("-n", netns, "link", "show")
    tap.set_offload(TUN_F_CSUM | TUN_F_TSO4)
    tap.close()
    assert "evt0" not in ip("-n", netns, "link", "show")


def test_open_attaches_to_an_existing_tap(netns: str) -> None:
    ip("-n", netns, "tuntap", "add", "evt1", "mode", "tap")
    ip("-n", netns, "link", "set", "evt1", "mtu", "9000")
    with inside(netns):
        tap = open_tap("evt1")
        assert tap.mtu() == 9000
    tap.close()
    assert "evt1" in ip("-n", netns, "link", "show")  # not evmm's to delete


def test_a_multi_queue_tap_is_a_fd_per_queue_and_queues_leave_and_rejoin(netns: str) -> None:
    with inside(netns):
        tap = open_tap("evmq0", queues=3)
    try:
        assert len(tap.queues) == 3 and tap.fd == tap.queues[0] and len(set(tap.queues)) == 3
        assert all(not os.get_blocking(fd) for fd in tap.queues)
        # Every queue is the same tap: TUNGETIFF names it, with IFF_MULTI_QUEUE.
        for fd in tap.queues:
            name, flags = _IFREQ.unpack(fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0)))
            assert name.rstrip(b"\0") == b"evmq0" and flags & IFF_MULTI_QUEUE
        tap.set_queue_attached(2, False)
        with pytest.raises(OSError):  # the kernel refuses to detach it twice: the call reached it
            tap.set_queue_attached(2, False)
        tap.set_queue_attached(2, True)
    finally:
        tap.close()
    assert "evmq0" not in ip("-n", netns, "link", "show")


def test_a_single_queue_tap_made_beforehand_is_attached_as_it_is(netns: str) -> None:
    ip("-n", netns, "tuntap", "add", "evsq0", "mode", "tap")
    with inside(netns):
        tap = open_tap("evsq0", queues=4)
    assert len(tap.queues) == 1
    tap.close()


def test_make_net_gives_a_vhost_nic_a_pair_per_vcpu(netns: str) -> None:
    opened: list[FakeVhostNet] = []

    def opener() -> FakeVhostNet:
        opened.append(FakeVhostNet())
        return opened[-1]

    with inside(netns):
        dev = make_net(NetSpec(tap="evmq1"), 0, cpus=2, open_vhost=opener)
        one = make_net(NetSpec(tap="evmq2", vhost=True), 1, cpus=1, open_vhost=opener)
        own = make_net(NetSpec(tap="evmq3", vhost=False), 2, cpus=2, open_vhost=opener)
    try:
        assert isinstance(dev, VhostNet) and dev.pairs == 2 and len(dev.tap.queues) == 2
        assert isinstance(one, VhostNet) and one.pairs == 1
        assert isinstance(own, VirtioNet) and len(opened) == 3
    finally:
        for d in (dev, one, own):
            d.close()
    assert all(f.closed for f in opened)


def test_errors_are_one_line_and_say_what_to_do(netns: str) -> None:
    ip("-n", netns, "tuntap", "add", "evtun", "mode", "tun")
    ip("-n", netns, "tuntap", "add", "evmq", "mode", "tap", "multi_queue")
    ip("-n", netns, "tuntap", "add", "evbusy", "mode", "tap")
    open_ = "from evmm.devices.virtio.net.tap import open_tap\n    "
    cases = {
        "lo": "exists and is not a tap device",
        "evtun": "tun (layer 3) device, not a tap",
        "evmq": "multi-queue tap",
    }
    for name, expected in cases.items():
        msg = in_ns_error(netns, f"{open_}open_tap({name!r})")
        assert expected in msg and "\n" not in msg, msg
    msg = in_ns_error(netns, f"{open_}a = open_tap('evbusy')\n    b = open_tap('evbusy')")
    assert "in use by another process" in msg, msg


def test_missing_tun_device() -> None:
    with pytest.raises(ConfigError, match=r"/nonexistent/tun does not exist: load the tun module"):
        open_tap("evt0", tun_path="/nonexistent/tun")


def test_bad_names() -> None:
    for bad in ("", "a" * 16, "a/b", "..", "has space"):
        with pytest.raises(ConfigError, match="not a valid interface name"):
            open_tap(bad)


def test_permission_denied_for_an_unprivileged_user(netns: str) -> None:
    # Everything is imported before the privileges go: the interpreter's own files may be root's alone.
    script = (
        "import os\nfrom evmm.devices.virtio.net.tap import open_tap\nfrom evmm.errors import ConfigError\n"
        "os.setgroups([])\nos.setgid(65534)\nos.setuid(65534)\n"
        "try:\n    open_tap('evt9')\nexcept ConfigError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert "permission denied" in out.stdout, out.stdout + out.stderr


def test_wrapping_a_passed_fd(netns: str, tmp_path: Path) -> None:
    closed = os.open("/dev/null", os.O_RDONLY)
    os.close(closed)
    with pytest.raises(ConfigError, match="not open"):
        wrap_tap_fd(closed)
    (tmp_path / "f").write_bytes(b"")
    with open(tmp_path / "f") as f, pytest.raises(ConfigError, match="not a tap fd"):
        wrap_tap_fd(f.fileno())
    unattached = os.open("/dev/net/tun", os.O_RDWR)
    try:
        with pytest.raises(ConfigError, match="not attached"):
            wrap_tap_fd(unattached)
    finally:
        os.close(unattached)
    # In this namespace, so that its /sys shows the tap's flags (TUNGETIFF cannot tell IFF_NO_PI apart).
    plain = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(plain, TUNSETIFF, struct.pack("16sH22x", b"evplain", IFF_TAP))
    try:
        with pytest.raises(ConfigError, match="without IFF_NO_PI and IFF_VNET_HDR"):
            wrap_tap_fd(plain)
    finally:
        os.close(plain)
    with inside(netns):
        good = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(good, TUNSETIFF, struct.pack("16sH22x", b"evgood", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    tap = wrap_tap_fd(good)
    assert tap.name == "evgood" and tap.fd == good
    tap.close()


# ---- end to end against the host kernel ----------------------------------------------------------------


def _eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:] + payload


def _udp(src: bytes, dst: bytes, sport: int, dport: int, data: bytes, check: int | None = None) -> bytes:
    """A UDP datagram; ``check`` None fills in the full checksum, else that value goes in the field."""
    length = 8 + len(data)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + data
    if check is None:
        check = inet_checksum(src + dst + struct.pack("!BBH", 0, 17, length) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", check) + seg[8:]


def _pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    """What a driver leaves in the checksum field with NEEDS_CSUM: the folded, uncomplemented pseudo-header sum."""
    return ~inet_checksum(src + dst + struct.pack("!BBH", 0, 17, length)) & 0xFFFF


class Guest:
    """The fake driver playing a guest at GUEST_IP behind the virtio-net device."""

    def __init__(self, dev: VirtioNet, loop: asyncio.AbstractEventLoop) -> None:
        self.dev = dev
        self.loop = loop
        self.d = MmioDriver(dev, loop=loop)
        self.d.bring_up()
        self.mac = dev.mac
        self._used: list[Used] = []
        self.post(32)

    def post(self, n: int) -> None:
        for _ in range(n):
            self.d.queues[0].add([], [4096])
        self.d.kick(0)

    def send(self, frame: bytes, hdr: h.NetHeader | None = None) -> None:
        self.d.queues[1].add([(hdr or h.NetHeader()).pack() + frame], [])
        self.d.kick(1)
        self.d.queues[1].get_used()

    def receive(self, match: bytes, offset: int, timeout: float = 5.0) -> tuple[h.NetHeader, bytes]:
        """The first frame received with ``match`` at ``offset`` (other traffic is skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.loop.run_until_complete(asyncio.sleep(0.005))
            got = self.d.queues[0].get_used()
            if got:
                self.post(len(got))
            self._used += got
            while self._used:
                count = struct.unpack_from("<H", self._used[0].data, 10)[0]
                if len(self._used) < count:
                    break
                data = b"".join(u.data for u in self._used[:count])
                del self._used[:count]
                frame = data[h.HDR_LEN :]
                if frame[offset : offset + len(match)] == match:
                    return h.NetHeader.parse(data), frame
        raise AssertionError(f"no frame with {match.hex()} at {offset} within {timeout} s")


LOOP_KINDS = ("uvloop",)  # evmm's reactor (the `loop` fixture, tests/conftest.py)


def _guest_on_a_tap(ns: str, loop: asyncio.AbstractEventLoop, **kw: bool) -> Guest:
    with inside(ns):
        dev = make_net(NetSpec(tap="evt0", vhost=False), 0)
    assert isinstance(dev, VirtioNet)
    if kw:
        dev = VirtioNet(dev.tap, dev.mac, mtu=dev.mtu, **kw)
    ip("-n", ns, "addr", "add", "10.77.0.1/24", "dev", "evt0")
    ip("-n", ns, "link", "set", "evt0", "up")
    return Guest(dev, loop)


def test_guest_and_host_kernel_talk_through_the_tap(netns: str, loop: asyncio.AbstractEventLoop) -> None:
    g = _guest_on_a_tap(netns, loop)
    try:
        host_mac = bytes.fromhex(_mac_of(netns, "evt0"))
        # ARP: who has 10.77.0.1? The host kernel answers (and learns the guest's address).
        arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, g.mac, GUEST_IP, b"\0" * 6, HOST_IP)
        g.send(_eth(BROADCAST, g.mac, 0x0806, arp))
        _, reply = g.receive(b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x02", 12)
        assert reply[22:28] == host_mac and reply[28:32] == HOST_IP
        # ICMP echo to the host and its reply.
        echo = struct.pack("!BBHHH", 8, 0, 0, 0x77, 1) + b"evmm ping"
        echo = echo[:2] + struct.pack("!H", inet_checksum(echo)) + echo[4:]
        g.send(_eth(host_mac, g.mac, 0x0800, _ipv4(GUEST_IP, HOST_IP, 1, echo)))
        _, pong = g.receive(b"\x00\x00", 34)  # ICMP type 0 (echo reply), code 0
        assert pong[26:30] == HOST_IP and pong[42:] == b"evmm ping"

        with inside(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind(("10.77.0.1", 7777))
            sock.settimeout(2)
            # The host drops a datagram whose checksum is wrong...
            bad = _udp(GUEST_IP, HOST_IP, 5555, 7777, b"corrupt", check=0x1234)
            g.send(_eth(host_mac, g.mac, 0x0800, _ipv4(GUEST_IP, HOST_IP, 17, bad)))
            # ...and takes one the guest left to the device to checksum (NEEDS_CSUM, §5.1.6.2).
            part = _udp(GUEST_IP, HOST_IP, 5555, 7777, b"offloaded", check=_pseudo_sum(GUEST_IP, HOST_IP, 17))
            g.send(
                _eth(host_mac, g.mac, 0x0800, _ipv4(GUEST_IP, HOST_IP, 17, part)),
                h.NetHeader(h.F_NEEDS_CSUM, 0, 42, 0, 34, 6),
            )
            data, addr = sock.recvfrom(100)
            assert (data, addr) == (b"offloaded", ("10.77.0.2", 5555))

            # Host to guest: with GUEST_CSUM negotiated the tap may hand over a partial checksum; complete it
            # as the header says and the datagram must check out.
            sock.sendto(b"from the host" * 10, ("10.77.0.2", 8888))
            hdr, dgram = g.receive(struct.pack("!H", 8888), 36)
            assert dgram[42:] == b"from the host" * 10
            assert hdr.flags == h.F_NEEDS_CSUM  # TUNSETOFFLOAD took: the host left the checksum to the guest
            _assert_udp_checksum(hdr, dgram)
        assert g.dev.stats.tx_drops == 0 and g.dev.stats.rx_drops == 0
    finally:
        g.d.transport.close()


def test_without_offloads_the_host_checksums_for_the_guest(
    netns: str, loop: asyncio.AbstractEventLoop
) -> None:
    g = _guest_on_a_tap(netns, loop, offloads=False, mergeable=False)
    try:
        ip("-n", netns, "neigh", "add", "10.77.0.2", "lladdr", g.mac.hex(":"), "dev", "evt0")
        with inside(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.sendto(b"x" * 1000, ("10.77.0.2", 8888))
            hdr, dgram = g.receive(struct.pack("!H", 8888), 36)
        assert hdr.flags == 0 and hdr.num_buffers == 1
        _assert_udp_checksum(hdr, dgram)
    finally:
        g.d.transport.close()


def _mac_of(ns: str, dev: str) -> str:
    out = ip("-n", ns, "-o", "link", "show", dev)
    return out.split("link/ether ")[1].split()[0].replace(":", "")


def _assert_udp_checksum(hdr: h.NetHeader, frame: bytes) -> None:
    ihl = (frame[14] & 0xF) * 4
    src, dst = frame[26:30], frame[30:34]
    seg = bytearray(frame[14 + ihl :])
    if hdr.flags & h.F_NEEDS_CSUM:
        start, off = hdr.csum_start - 14 - ihl, hdr.csum_offset
        assert (start, off) == (0, 6)
        struct.pack_into("!H", seg, off, inet_checksum(bytes(seg)))
    assert inet_checksum(src + dst + struct.pack("!BBH", 0, 17, len(seg)) + bytes(seg)) == 0
