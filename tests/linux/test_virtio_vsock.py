"""virtio-vsock against Linux's vsock driver and socat (issue 4), with both host sides.

Hybrid (Unix sockets): a 16 MiB stream host -> guest (``CONNECT <port>`` on the device's socket, socat
``VSOCK-LISTEN`` in the guest) and back guest -> host (socat ``VSOCK-CONNECT:2:<port>`` reaching
``<path>_<port>``), checked by SHA-256; eight concurrent streams both ways; a guest connect to a port nobody
listens on fails at once (RST).

vhost (``vhost=on``, the kernel's /dev/vhost-vsock): the same streams through AF_VSOCK sockets of this host
(the guest at its CID, the host at CID 2), and a second VMM asking for a CID in use is refused in one line.
Both print their stream rates, so one run compares the two host sides.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF
from tests.conftest import GuestFactory
from tests.linux.harness import READY, Guest, evmm_run_argv
from tests.linux.jail_mode import unix_listener

BOOT_TIMEOUT = 120.0
CID = 42
VHOST_CIDS = (43, 44)  # one per vhost test: a CID stays claimed until its VMM has closed /dev/vhost-vsock
VHOST_DEVICE = Path("/dev/vhost-vsock")
BIG = 16 << 20
SMALL = 1 << 20
BLOCK = 65536  # socat's buffer: its default 8 KiB means four times the syscalls and packets
SHA_RE = re.compile(r"\b([0-9a-f]{64})\b")


@pytest.fixture
def sock_dir() -> Path:
    # Short: <path>_<port> must fit a Unix socket address (108 bytes), which pytest's tmp_path may not.
    import tempfile

    return Path(tempfile.mkdtemp(prefix="evmm-vs-", dir="/tmp"))


def vsock_argv(assets: GuestAssets, vsock: str, board: str) -> list[str]:
    if not assets.tools_initramfs.is_file():
        pytest.skip("the tools initramfs (socat) was not built")
    return [
        *evmm_run_argv(assets.vmlinux, assets.tools_initramfs, memory="512M", board=board),
        "--vsock",
        vsock,
    ]


def boot(launch: GuestFactory, assets: GuestAssets, path: Path, name: str, board: str) -> Guest:
    guest = launch(vsock_argv(assets, f"cid={CID},path={path}", board), f"{name}-{board}")
    guest.expect(READY, BOOT_TIMEOUT)
    return guest


def boot_vhost(launch: GuestFactory, assets: GuestAssets, cid: int, name: str, board: str) -> Guest:
    if not VHOST_DEVICE.exists():
        pytest.skip(f"{VHOST_DEVICE} does not exist on this host (the vhost_vsock module is not loaded)")
    guest = launch(vsock_argv(assets, f"cid={cid},vhost=on", board), f"{name}-{board}")
    guest.expect(READY, BOOT_TIMEOUT)
    return guest


def hybrid_connect(path: Path, port: int, timeout: float = 60.0) -> socket.socket:
    """Connect to guest port ``port`` through the device's socket, retrying until the guest listens."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            try:
                b = s.recv(1)
            except ConnectionResetError:
                b = b""
            if not b:
                break
            line += b
        if line.startswith(b"OK "):
            return s
        s.close()  # the guest answered RST: nobody listens yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest port {port} never accepted a connection")
        time.sleep(0.3)


def send_all_then_drain(s: socket.socket, data: bytes) -> bytes:
    """Send ``data``, half-close, and read what comes back until the guest closes."""
    out = bytearray()
    reader = threading.Thread(daemon=True, target=lambda: _read_to_eof(s, out))
    reader.start()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reader.join()
    s.close()
    return bytes(out)


def _read_to_eof(s: socket.socket, out: bytearray) -> None:
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass


def sha_in(text: str) -> str:
    m = SHA_RE.search(text)
    assert m is not None, f"no SHA-256 in {text!r}"
    return m.group(1)


@pytest.mark.both_boards
def test_16mib_each_way(
    launch: GuestFactory,
    guest_assets: GuestAssets,
    sock_dir: Path,
    capsys: pytest.CaptureFixture[str],
    board: str,
) -> None:
    path = sock_dir / "v.sock"
    guest = boot(launch, guest_assets, path, "evmm-vsock-16m", board)
    blob = os.urandom(BIG)
    want = hashlib.sha256(blob).hexdigest()

    # host -> guest: the guest listens, the host connects through the hybrid socket.
    guest.check(f"socat -u -b {BLOCK} VSOCK-LISTEN:5000 CREATE:/tmp/blob >/tmp/rx.log 2>&1 & true")
    s = hybrid_connect(path, 5000)
    started = time.monotonic()
    echoed = send_all_then_drain(s, blob)  # returns when the guest has closed: all of it is in
    down = time.monotonic() - started
    guest.check("wait", timeout=120)
    assert echoed == b""
    assert sha_in(guest.check("sha256sum /tmp/blob", timeout=120)) == want

    # guest -> host: the guest connects to CID 2 port 5001, which is the Unix socket <path>_5001.
    listener = unix_listener(f"{path}_5001", 1)
    got = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        _read_to_eof(conn, got)
        conn.close()

    t = threading.Thread(daemon=True, target=serve)
    t.start()
    started = time.monotonic()
    guest.check(f"socat -u -b {BLOCK} FILE:/tmp/blob VSOCK-CONNECT:2:5001", timeout=180)
    t.join(60)
    up = time.monotonic() - started
    assert len(got) == BIG and hashlib.sha256(got).hexdigest() == want
    rates = f"host->guest {BIG / down / 1e6:.1f} MB/s, guest->host {BIG / up / 1e6:.1f} MB/s"
    with capsys.disabled():  # so the measurement shows in the tier's log
        print(f"\nvsock 16 MiB through socat: {rates}")
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def test_eight_concurrent_streams_and_rst(
    launch: GuestFactory, guest_assets: GuestAssets, sock_dir: Path, board: str
) -> None:
    path = sock_dir / "v.sock"
    guest = boot(launch, guest_assets, path, "evmm-vsock-8", board)
    # Nobody listens on host port 7777: the device answers RST and socat fails at once.
    started = time.monotonic()
    out, status = guest.run("socat -u OPEN:/dev/null VSOCK-CONNECT:2:7777 2>&1", timeout=30)
    assert status != 0 and "reset" in out.lower()
    assert time.monotonic() - started < 20

    guest_sha = sha_in(
        guest.check("head -c 1048576 /dev/urandom > /tmp/small && sha256sum /tmp/small", timeout=60)
    )
    guest.check("socat VSOCK-LISTEN:6000,fork EXEC:cat >/dev/null 2>&1 & true")

    # Four echo streams host -> guest -> host ...
    payloads = [os.urandom(SMALL) for _ in range(4)]
    echoes: list[bytes] = [b""] * 4

    def echo(i: int) -> None:
        echoes[i] = send_all_then_drain(hybrid_connect(path, 6000), payloads[i])

    # ... and four guest -> host streams, all at once.
    listener = unix_listener(f"{path}_6001", 8)
    uploads: list[bytearray] = [bytearray() for _ in range(4)]

    def accept(i: int) -> None:
        conn, _ = listener.accept()
        _read_to_eof(conn, uploads[i])
        conn.close()

    threads = [threading.Thread(daemon=True, target=echo, args=(i,)) for i in range(4)]
    threads += [threading.Thread(daemon=True, target=accept, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    guest.check(
        'pids=""; for i in 1 2 3 4; do socat -u FILE:/tmp/small VSOCK-CONNECT:2:6001 & pids="$pids $!"; done; '
        "rc=0; for p in $pids; do wait $p || rc=1; done; test $rc = 0",
        timeout=240,
    )
    for t in threads:
        t.join(240)
        assert not t.is_alive()
    for i in range(4):
        assert hashlib.sha256(echoes[i]).digest() == hashlib.sha256(payloads[i]).digest()
        assert hashlib.sha256(uploads[i]).hexdigest() == guest_sha
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


# ---- vhost=on: the host kernel carries the packets, host programs use AF_VSOCK -------------------------------


def vsock_connect(cid: int, port: int, timeout: float = 60.0) -> socket.socket:
    """Connect to guest ``cid``:``port``, retrying until the guest listens (until then it answers RST)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            s.connect((cid, port))
        except (ConnectionResetError, ConnectionRefusedError, TimeoutError):
            # TimeoutError: the kernel's own connect timeout (2 s), which a guest under emulation can miss.
            s.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest {cid} port {port} never accepted a connection") from None
            time.sleep(0.3)
            continue
        s.settimeout(timeout)
        return s


def vsock_listener(port: int, backlog: int = 8) -> socket.socket:
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(backlog)
    listener.settimeout(240)
    return listener


def test_vhost_16mib_each_way(
    launch: GuestFactory, guest_assets: GuestAssets, capsys: pytest.CaptureFixture[str], board: str
) -> None:
    cid = VHOST_CIDS[0]
    guest = boot_vhost(launch, guest_assets, cid, "evmm-vhost-vsock-16m", board)
    blob = os.urandom(BIG)
    want = hashlib.sha256(blob).hexdigest()

    # host -> guest: the guest listens, this host connects to it by CID.
    guest.check(f"socat -u -b {BLOCK} VSOCK-LISTEN:5000 CREATE:/tmp/blob >/tmp/rx.log 2>&1 & true")
    s = vsock_connect(cid, 5000)
    started = time.monotonic()
    echoed = send_all_then_drain(s, blob)  # returns when the guest has closed: all of it is in
    down = time.monotonic() - started
    guest.check("wait", timeout=120)
    assert echoed == b""
    assert sha_in(guest.check("sha256sum /tmp/blob", timeout=120)) == want

    # guest -> host: the guest connects to CID 2 port 5001, where this host listens.
    listener = vsock_listener(5001)
    got = bytearray()
    peers: list[tuple[int, int]] = []

    def serve() -> None:
        conn, peer = listener.accept()
        peers.append(peer)
        _read_to_eof(conn, got)
        conn.close()

    t = threading.Thread(daemon=True, target=serve)
    t.start()
    started = time.monotonic()
    guest.check(f"socat -u -b {BLOCK} FILE:/tmp/blob VSOCK-CONNECT:2:5001", timeout=180)
    t.join(60)
    up = time.monotonic() - started
    listener.close()
    assert peers and peers[0][0] == cid  # the connection came from the guest's CID
    assert len(got) == BIG and hashlib.sha256(got).hexdigest() == want
    rates = f"host->guest {BIG / down / 1e6:.1f} MB/s, guest->host {BIG / up / 1e6:.1f} MB/s"
    with capsys.disabled():  # so the measurement shows in the tier's log
        print(f"\nvsock (vhost) 16 MiB through socat: {rates}")
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF


def test_vhost_concurrent_streams_rst_and_a_cid_in_use(
    launch: GuestFactory, guest_assets: GuestAssets, board: str
) -> None:
    cid = VHOST_CIDS[1]
    guest = boot_vhost(launch, guest_assets, cid, "evmm-vhost-vsock-8", board)

    # A second VMM cannot have the same CID: one line naming the option, before its guest boots.
    second = launch(vsock_argv(guest_assets, f"cid={cid},vhost=on", board), "evmm-vhost-vsock-same-cid")
    assert second.wait_exit(60) == 1
    errors = [ln for ln in second.log.splitlines() if ln.strip()]
    assert errors == [
        f"evmm: --vsock cid={cid},vhost=on: CID {cid} is already in use on this host (by another VM, or as "
        "this host's own vsock address): pick another cid="
    ], second.log

    # Nobody listens on host port 7777: the host kernel answers RST and socat fails at once.
    started = time.monotonic()
    out, status = guest.run("socat -u OPEN:/dev/null VSOCK-CONNECT:2:7777 2>&1", timeout=30)
    assert status != 0 and "reset" in out.lower()
    assert time.monotonic() - started < 20

    guest_sha = sha_in(
        guest.check("head -c 1048576 /dev/urandom > /tmp/small && sha256sum /tmp/small", timeout=60)
    )
    guest.check("socat VSOCK-LISTEN:6000,fork EXEC:cat >/dev/null 2>&1 & true")

    # Four echo streams host -> guest -> host ...
    payloads = [os.urandom(SMALL) for _ in range(4)]
    echoes: list[bytes] = [b""] * 4

    def echo(i: int) -> None:
        echoes[i] = send_all_then_drain(vsock_connect(cid, 6000), payloads[i])

    # ... and four guest -> host streams, all at once.
    listener = vsock_listener(6001)
    uploads: list[bytearray] = [bytearray() for _ in range(4)]

    def accept(i: int) -> None:
        conn, _ = listener.accept()
        _read_to_eof(conn, uploads[i])
        conn.close()

    threads = [threading.Thread(daemon=True, target=echo, args=(i,)) for i in range(4)]
    threads += [threading.Thread(daemon=True, target=accept, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    guest.check(
        'pids=""; for i in 1 2 3 4; do socat -u FILE:/tmp/small VSOCK-CONNECT:2:6001 & pids="$pids $!"; done; '
        "rc=0; for p in $pids; do wait $p || rc=1; done; test $rc = 0",
        timeout=240,
    )
    for t in threads:
        t.join(240)
        assert not t.is_alive()
    listener.close()
    for i in range(4):
        assert hashlib.sha256(echoes[i]).digest() == hashlib.sha256(payloads[i]).digest()
        assert hashlib.sha256(uploads[i]).hexdigest() == guest_sha
    guest.sendline("poweroff")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
