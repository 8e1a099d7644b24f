"""virtio-net on a tap, against Linux's virtio_net driver (issue 4, "Done means"; vhost-net: issue 20).

The test makes a network namespace of its own, runs ``evmm run --net tap=...`` inside it (``ip netns exec``)
and plays the host there: the host end of the tap is 10.0.2.1, the guest 10.0.2.15.  Guest and host ping each
other, and a TCP stream carries the same random bytes host -> guest and back guest -> host, checked by SHA-256
on both sides.  The namespace, and the taps in it, are deleted when the test ends, whatever its outcome.
Each test runs with the kernel's vhost-net moving the frames (vhost=on, which fails the boot if vhost-net
cannot be used) and with evmm moving them (vhost=off).

EVMM_NET_TEST_MIB sets the stream size (default 64 MiB, the issue's figure).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF
from evmm.netns import inet_checksum, inside, ip, unavailable
from evmm.netns import netns as evmm_netns
from tests.conftest import GuestFactory
from tests.linux.conftest import ALL_BOARDS_ENV
from tests.linux.harness import PROMPT, READY, Guest, evmm_run_argv
from tests.linux.test_control import call, wait_for_socket

BOOT_TIMEOUT = 300.0  # a quiet boot takes 20-60 s in the TCG test host, more when the machine is busy
HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
MAC = "52:54:00:12:34:56"
STREAM = int(os.environ.get("EVMM_NET_TEST_MIB", "64")) << 20
STREAM_TIMEOUT = 600.0  # seconds for one direction; under the TCG test host a MiB takes ~0.1-4 s
SHA_RE = re.compile(r"\b([0-9a-f]{64})\b")
# Feature bits the guest must have accepted (virtio 1.2 §5.1.3): CSUM, GUEST_CSUM, MAC, GUEST_TSO4/6,
# HOST_TSO4/6, MRG_RXBUF, STATUS.
NEGOTIATED = (0, 1, 5, 7, 8, 11, 12, 15, 16)


pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


@pytest.fixture
def netns() -> Iterator[str]:
    with evmm_netns("evmm-net") as name:
        yield name


@pytest.fixture(params=["on", "off"], ids=["vhost", "evmm"])
def vhost(request: pytest.FixtureRequest) -> str:
    """Who moves the frames: the kernel's vhost-net (on) or evmm (off)."""
    return str(request.param)


def host_side(ns: str, tap: str) -> None:
    ip("-n", ns, "addr", "add", f"{HOST_IP}/24", "dev", tap)
    ip("-n", ns, "link", "set", tap, "up")


def boot(
    launch: GuestFactory,
    assets: GuestAssets,
    ns: str,
    tap: str,
    name: str,
    vhost: str,
    *,
    board: str = "microvm",
    cpus: int = 1,
    extra: tuple[str, ...] = (),
) -> Guest:
    if not assets.tools_initramfs.is_file():
        pytest.skip("the tools initramfs (socat) was not built")
    argv = [
        *("ip", "netns", "exec", ns),
        # One vCPU for the long streams: in the TCG test host a two-vCPU guest under a long TCP stream
        # sometimes dies, with QEMU's microvm as with evmm (measured: QEMU 1 of 2 runs died with 2 vCPUs, 3 of 3
        # passed with 1); SMP is covered by the boot tests.  ("id N is not a head", once blamed on the same,
        # was evmm's: a4c2d81.)
        *evmm_run_argv(assets.vmlinux, assets.tools_initramfs, memory="512M", cpus=cpus, board=board),
        *("--net", f"tap={tap},mac={MAC},vhost={vhost}"),
        *extra,
    ]
    guest = launch(argv, name)
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)
    return guest


def guest_nic(guest: Guest) -> str:
    """Bring the guest's NIC up at GUEST_IP; its name."""
    names = [n for n in guest.check("ls /sys/class/net").split() if n != "lo"]
    assert len(names) == 1, names
    nic = names[0]
    guest.check(f"ip addr add {GUEST_IP}/24 dev {nic} && ip link set {nic} up")
    return nic


def host_ping(ns: str, dst: str, count: int = 3, timeout: float = 10.0) -> int:
    """ICMP echo from the host side of the tap (a raw socket in ``ns``); how many replies came back."""
    with inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    replies = 0
    with s:
        for seq in range(count):
            body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"evmm-net-test"
            s.sendto(body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:], (dst, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, addr = s.recvfrom(2048)
                except TimeoutError:
                    break
                icmp = data[(data[0] & 0xF) * 4 :]
                if addr[0] == dst and icmp[0] == 0 and struct.unpack_from("!HH", icmp, 4) == (ident, seq):
                    replies += 1
                    break
    return replies


class OneConnection(threading.Thread):
    """Accept one TCP connection on the host side and run ``serve`` on it, off the test's thread."""

    def __init__(self, ns: str, port: int, serve: Callable[[socket.socket], object]) -> None:
        super().__init__(daemon=True)
        with inside(ns):
            self.listener = socket.create_server((HOST_IP, port))
        self.listener.settimeout(STREAM_TIMEOUT)
        self.serve = serve
        self.result: object = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(STREAM_TIMEOUT)
                self.result = self.serve(conn)
        except BaseException as e:
            self.error = e
        finally:
            self.listener.close()

    def outcome(self) -> object:
        self.join(STREAM_TIMEOUT)
        if self.error is not None:
            raise self.error
        return self.result


# 90-300 s in a one-vCPU test host (its guest->host TCP: 3 or 16-60 Mbit/s), most tests ~25 s.
@pytest.mark.cost(200)
@pytest.mark.both_boards
def test_ping_and_a_tcp_stream_both_ways(
    netns: str,
    vhost: str,
    launch: GuestFactory,
    guest_assets: GuestAssets,
    capsys: pytest.CaptureFixture[str],
    board: str,
) -> None:
    # One boot for everything (the linux tier's time is shared).  No tap beforehand: evmm creates it in the
    # namespace it runs in; the host side is configured once it exists (a tap made with `ip tuntap add` and
    # attached is covered by tests/unit/test_virtio_net_tap.py).
    if board == "standard" and vhost == "off" and os.environ.get(ALL_BOARDS_ENV) != "1":
        # evmm's own data path does not depend on the transport, and the microvm variant covers it; on the
        # standard board the default run takes vhost-net's, whose interrupts go through virtio-pci's MSI-X.
        pytest.skip(f"its vhost=off standard-board variant runs with {ALL_BOARDS_ENV}=1")
    guest = boot(launch, guest_assets, netns, "evtap0", f"evmm-net-{board}-{vhost}", vhost, board=board)
    host_side(netns, "evtap0")
    nic = guest_nic(guest)
    assert guest.check(f"cat /sys/class/net/{nic}/address").strip() == MAC
    features = guest.check(f"cat /sys/class/net/{nic}/device/features").strip()
    assert [b for b in NEGOTIATED if features[b] != "1"] == [], features
    out = guest.check(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
    assert "3 packets received" in out, out
    assert host_ping(netns, GUEST_IP) == 3

    data = os.urandom(STREAM)
    digest = hashlib.sha256(data).hexdigest()

    def send(conn: socket.socket) -> None:
        conn.sendall(data)

    def receive(conn: socket.socket) -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        while chunk := conn.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    mib = STREAM >> 20
    sender = OneConnection(netns, 5001, send)
    t0 = time.monotonic()
    guest.check(f"socat -u TCP:{HOST_IP}:5001,connect-timeout=30 CREATE:/tmp/rx", timeout=STREAM_TIMEOUT)
    down = time.monotonic() - t0
    sender.outcome()
    m = SHA_RE.search(guest.check("sha256sum /tmp/rx", timeout=300))
    assert m is not None and m.group(1) == digest, "host -> guest: the guest's copy differs"

    receiver = OneConnection(netns, 5002, receive)
    t0 = time.monotonic()
    guest.check(f"socat -u OPEN:/tmp/rx TCP:{HOST_IP}:5002,connect-timeout=30", timeout=STREAM_TIMEOUT)
    got = receiver.outcome()
    up = time.monotonic() - t0
    assert got == (digest, STREAM), "guest -> host: the host's copy differs"
    with capsys.disabled():  # so the measurement shows in the tier's log
        print(
            f"\nvirtio-net TCP, vhost={vhost}: host -> guest {mib / down:.1f} MiB/s, "
            f"guest -> host {mib / up:.1f} MiB/s ({mib} MiB)"
        )
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


@pytest.mark.no_jail(
    "its tap is named in a control call after boot: none can be made for the jail's user first"
)
def test_hot_replace_a_tap_into_an_empty_slot(
    netns: str, vhost: str, launch: GuestFactory, guest_assets: GuestAssets
) -> None:
    """Issue 5's net slots: an empty NIC (link down) gets a tap while the guest runs, then loses it."""
    with tempfile.TemporaryDirectory(prefix="evmm-net-", dir="/tmp") as d:
        sock = Path(d) / "api.sock"
        argv = [
            *("ip", "netns", "exec", netns),
            *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs),
            *("--hotplug", f"net=1,vhost={vhost}", "--api-sock", str(sock)),
        ]
        guest = launch(argv, f"evmm-net-hotplug-{vhost}")
        guest.expect(READY, BOOT_TIMEOUT)
        guest.expect(PROMPT, 30)
        wait_for_socket(sock)
        slots = [s for s in call(sock, "query-hotplug")["slots"] if s["kind"] == "net"]
        assert len(slots) == 1 and not slots[0]["occupied"], slots
        assert nic_device(sock)["device"] == ("vhost-net" if vhost == "on" else "virtio-net")
        nic = guest_nic(guest)
        assert carrier(guest, nic) == "0"

        filled = call(sock, "device-replace", slot=slots[0]["id"], tap="evhot0")
        assert filled["occupied"] and filled["backend"] == "evhot0"
        host_side(netns, "evhot0")
        wait_carrier(guest, nic, "1")
        out = guest.check(f"ping -c 3 -W 5 {HOST_IP}", timeout=60)
        assert "3 packets received" in out, out
        assert host_ping(netns, GUEST_IP) == 3

        call(sock, "device-remove", slot=slots[0]["id"])
        wait_carrier(guest, nic, "0")
        out, status = guest.run(f"ping -c 1 -W 2 {HOST_IP}", timeout=30)
        assert status != 0, out
        guest.sendline("poweroff")
        assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def carrier(guest: Guest, nic: str) -> str:
    return guest.check(f"cat /sys/class/net/{nic}/carrier").strip()


def wait_carrier(guest: Guest, nic: str, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := carrier(guest, nic)) != want:
        assert time.monotonic() < deadline, f"{nic}: carrier stayed {now}, not {want}"
        time.sleep(0.5)


def nic_device(sock: Path) -> dict[str, Any]:
    """The NIC's transport and device state in query-vm (there is one NIC): a virtio-mmio device of
    ``devices``, or on the standard board a function of ``pci``."""
    vm = call(sock, "query-vm")
    nics = [
        d["virtio"]
        for d in [*vm["devices"], *vm.get("pci", [])]
        if d.get("virtio", {}).get("device") in ("virtio-net", "vhost-net")
    ]
    assert len(nics) == 1, nics
    return dict(nics[0])


def test_multiqueue_a_pair_per_vcpu(
    board: str, netns: str, launch: GuestFactory, guest_assets: GuestAssets
) -> None:
    """vhost-net with two vCPUs: two queue pairs (VIRTIO_NET_F_MQ), both used once the driver asks for them
    (on the standard board each queue with its own MSI-X vector)."""
    with tempfile.TemporaryDirectory(prefix="evmm-net-", dir="/tmp") as d:
        sock = Path(d) / "api.sock"
        guest = boot(
            launch,
            guest_assets,
            netns,
            "evmq0",
            "evmm-net-mq",
            "on",
            board=board,
            cpus=2,
            extra=("--api-sock", str(sock)),
        )
        host_side(netns, "evmq0")
        nic = guest_nic(guest)
        features = guest.check(f"cat /sys/class/net/{nic}/device/features").strip()
        assert features[22] == "1", features  # VIRTIO_NET_F_MQ (§5.1.3), and with it CTRL_VQ (17)
        assert features[17] == "1", features
        queues = guest.check(f"ls /sys/class/net/{nic}/queues").split()
        assert sorted(queues) == ["rx-0", "rx-1", "tx-0", "tx-1"], queues
        wait_for_socket(sock)
        state = nic_device(sock)
        # Linux's virtio_net asked for min(pairs, CPUs) with VQ_PAIRS_SET on the control queue (§5.1.6.5.5).
        assert state["queue_pairs"] == 2 and state["pairs_in_use"] == 2, state
        # From CPU 1 the driver transmits on transmitq2 (its XPS map), and the host's replies come back on
        # whichever receive queue the tap hashes them to: the pings prove both directions of the second pair
        # work; the used index of transmitq2 (queue 3, read from guest RAM) that the kernel moved it.
        out = guest.check(f"taskset 2 ping -c 3 -W 5 {HOST_IP}", timeout=60)
        assert "3 packets received" in out, out
        assert nic_device(sock)["queues"][3]["used_idx"] > 0
        # Frames of many flows, host -> guest: the tap spreads them over both receive queues.
        with inside(netns):
            senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
        for s in senders:
            with s:
                s.sendto(b"evmm-mq", (GUEST_IP, 9))
        deadline = time.monotonic() + 30
        while nic_device(sock)["queues"][2]["used_idx"] == 0:
            assert time.monotonic() < deadline, "receiveq2 never got a frame from 32 flows"
            time.sleep(0.5)
        assert host_ping(netns, GUEST_IP) == 3
        guest.sendline("poweroff")
        assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
