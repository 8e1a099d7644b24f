#!/usr/bin/env python3
"""Measure virtio-net's TX and RX paths on this host (not a test): python scripts/bench_net.py [--quick]

Every figure is the device's own time: the driver-side fake (tests/fakes/virtio_driver.py) posts chains and the
test plays the host network outside the timed region, so what is timed is the kick -- popping and checking
chains, the header checks, the readv/writev, the used-ring updates and the interrupt -- on uvloop.

1. A fake tap (an AF_UNIX SOCK_SEQPACKET socketpair): evmm's cost per frame with the kernel doing almost
   nothing, for 64-byte, 1514-byte and 64 KiB (TSO) frames; RX both with mergeable 4 KiB buffers (what Linux
   posts with VIRTIO_NET_F_MRG_RXBUF) and with the 64 KiB "big packet" buffers Linux posts without it.
2. A real tap in a network namespace of the script's own (root only): TX of UDP frames into the host's
   stack, and RX of UDP datagrams the host sends to the fake guest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from evmm.config.devspec import NetSpec
from evmm.devices.virtio.net import VirtioNet, make_net
from evmm.devices.virtio.net import header as h
from evmm.netns import inet_checksum, inside, netns
from tests.fakes.virtio_driver import MmioDriver

ALL = (1 << 64) - 1
NO_MRG = ALL & ~h.VIRTIO_NET_F_MRG_RXBUF
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
MAC = bytes.fromhex("525400abcdef")


class SocketTap:
    def __init__(self) -> None:
        self.dev_end, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.dev_end, self.host):
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 16 << 20)
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            except PermissionError:
                pass

    @property
    def fd(self) -> int:
        return self.dev_end.fileno()

    def set_offload(self, flags: int) -> None:
        pass

    def close(self) -> None:
        self.dev_end.close()
        self.host.close()

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.host.recv(1 << 17)
                n += 1
            except BlockingIOError:
                return n


def frame(size: int) -> bytes:
    return MAC + bytes(6) + b"\x08\x00" + bytes(size - 14)


def report(what: str, frames: int, nbytes: int, seconds: float) -> None:
    per = seconds / frames * 1e6
    print(
        f"  {what:<44} {frames / seconds:>10,.0f} frames/s {nbytes * 8 / seconds / 1e9:>7.2f} Gbit/s  {per:6.1f} us/frame"
    )


def bench_tx(loop: asyncio.AbstractEventLoop, size: int, total: int) -> None:
    tap = SocketTap()
    d = MmioDriver(VirtioNet(tap, MAC), loop=loop)
    d.bring_up()
    q = d.queues[1]
    hdr = (
        h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 66, 1448, 34, 16) if size > 1514 else h.NetHeader()
    ).pack()
    f = frame(size)
    batch = 128 if size <= 1514 else 32
    elapsed, done = 0.0, 0
    while done < total:
        for _ in range(batch):
            q.add([hdr, f], [])  # header apart from the frame, as Linux sends without headroom
        t0 = time.perf_counter()
        d.kick(1)
        elapsed += time.perf_counter() - t0
        assert tap.drain() == batch
        q.get_used()
        done += batch
    report(f"TX {size}-byte frames", done, done * size, elapsed)
    tap.close()


def bench_rx(loop: asyncio.AbstractEventLoop, size: int, total: int, *, mergeable: bool) -> None:
    tap = SocketTap()
    dev = VirtioNet(tap, MAC)
    d = MmioDriver(dev, loop=loop, features=ALL if mergeable else NO_MRG)
    d.bring_up()
    q = d.queues[0]
    # What Linux posts (drivers/net/virtio_net.c): one 4 KiB-ish buffer per chain when merging; without it,
    # "big packets": an indirect chain of the header, the rest of its page and MAX_SKB_FRAGS (17) more pages.
    layout = [4096] if mergeable else [12, 4096 - 16] + [4096] * 17
    per_frame = -(-(size + 12) // 4096) if mergeable else 1
    hdr = (
        h.NetHeader(h.F_NEEDS_CSUM, h.GSO_TCPV4, 66, 1448, 34, 16) if size > 1514 else h.NetHeader()
    ).pack()
    f = hdr + frame(size)
    batch = min(64, 256 // per_frame)
    elapsed, done = 0.0, 0
    while done < total:
        for _ in range(batch):
            tap.host.send(f)
        for _ in range(batch * per_frame):
            q.add([], layout, indirect=not mergeable)
        t0 = time.perf_counter()
        d.kick(0)
        elapsed += time.perf_counter() - t0
        done += batch
        q.get_used()
    assert dev.stats.rx_packets == done and dev.stats.rx_drops == 0
    mode = "mergeable 4 KiB" if mergeable else "big 19-page"
    report(f"RX {size}-byte frames into {mode} buffers", done, done * size, elapsed)
    tap.close()


# ---- a real tap ----------------------------------------------------------------------------------------------


def udp_frame(dst_mac: bytes, src_mac: bytes, payload: int) -> bytes:
    src, dst = bytes([10, 78, 0, 2]), bytes([10, 78, 0, 1])
    udp = struct.pack("!HHHH", 5000, 9, 8 + payload, 0) + bytes(payload)  # port 9 (discard), no checksum
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def bench_real_tap(loop: asyncio.AbstractEventLoop, total: int) -> None:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        print("  (skipped: needs root and /dev/net/tun)")
        return
    with netns("evmm-bench") as ns:
        with inside(ns):
            dev = make_net(NetSpec(tap="evb0", vhost=False), 0)
            assert isinstance(dev, VirtioNet)
            rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for cmd in (
            "addr add 10.78.0.1/24 dev evb0",
            "link set evb0 up",
            "link set evb0 txqueuelen 4096",
            f"neigh add 10.78.0.2 lladdr {dev.mac.hex(':')} dev evb0",
        ):
            subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)
        host_mac = bytes.fromhex(
            subprocess.run(["ip", "-n", ns, "-o", "link", "show", "evb0"], capture_output=True, text=True)
            .stdout.split("link/ether ")[1]
            .split()[0]
            .replace(":", "")
        )
        d = MmioDriver(dev, loop=loop)
        d.bring_up()
        # TX: UDP frames to the host's discard port (the host stack takes and drops them).
        f = udp_frame(host_mac, dev.mac, 1472)
        hdr = h.NetHeader().pack()
        q = d.queues[1]
        elapsed, done = 0.0, 0
        while done < total:
            for _ in range(128):
                q.add([hdr, f], [])
            t0 = time.perf_counter()
            d.kick(1)
            elapsed += time.perf_counter() - t0
            q.get_used()
            done += 128
        report("TX 1514-byte UDP frames into the host stack", done, done * len(f), elapsed)
        # RX: the host sends UDP datagrams to the guest; the device moves them into mergeable buffers.
        rxq = d.queues[0]
        payload = bytes(1472)
        elapsed, done = 0.0, 0
        while done < total:
            for _ in range(64):
                tx_sock.sendto(payload, ("10.78.0.2", 9))
            for _ in range(64):
                rxq.add([], [4096])
            t0 = time.perf_counter()
            d.kick(0)
            while dev.stats.rx_packets < done + 64:
                loop.run_until_complete(asyncio.sleep(0))
            elapsed += time.perf_counter() - t0
            rxq.get_used()
            done += 64
        report("RX 1514-byte UDP frames from the host stack", done, done * 1514, elapsed)
        d.transport.close()
        rx_sock.close()
        tx_sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer frames, for a smoke run")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    loop = uvloop.new_event_loop()
    runs: list[tuple[str, Callable[[], None]]] = [
        ("fake tap (socketpair), device time only:", lambda: None),
        ("", lambda: bench_tx(loop, 64, n)),
        ("", lambda: bench_tx(loop, 1514, n)),
        ("", lambda: bench_tx(loop, 65000, n // 10)),
        ("", lambda: bench_rx(loop, 64, n, mergeable=True)),
        ("", lambda: bench_rx(loop, 64, n, mergeable=False)),
        ("", lambda: bench_rx(loop, 1514, n, mergeable=True)),
        ("", lambda: bench_rx(loop, 1514, n, mergeable=False)),
        ("", lambda: bench_rx(loop, 65000, n // 10, mergeable=True)),
        ("", lambda: bench_rx(loop, 65000, n // 10, mergeable=False)),
        ("real tap in a network namespace:", lambda: None),
        ("", lambda: bench_real_tap(loop, n)),
    ]
    for title, run in runs:
        if title:
            print(title)
        run()
    loop.close()


if __name__ == "__main__":
    main()
