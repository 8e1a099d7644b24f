"""Network namespaces of evmm's own, for the network tests and the benchmark (iproute2's ``ip netns``).

A VMM run with ``ip netns exec NS`` creates its taps there; ``inside(NS)`` moves the calling thread there for a
while, so that sockets made meanwhile belong to it (Python 3.11 has no ``os.setns``; setns(2) via libc).
The host side of those tests also needs the Internet checksum, to build its own ICMP and UDP packets.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLONE_NEWNET = 0x40000000  # <sched.h>
_counter = itertools.count()


def unavailable() -> str | None:
    """Why this host cannot make namespaces and taps, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to make network namespaces and taps"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing (the tun module is not loaded)"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    return None


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output, or ``OSError`` with what ip said."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


@contextmanager
def netns(prefix: str, *, ipv6: bool = True) -> Iterator[str]:
    """A fresh namespace with its loopback up, deleted (with its taps) on the way out, whatever happens."""
    name = f"{prefix}-{os.getpid()}-{next(_counter)}"
    ip("netns", "add", name)
    try:
        if not ipv6:  # no router or neighbour solicitations as noise on the taps
            subprocess.run(
                ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
                capture_output=True,
                check=False,
            )
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread in ``ns`` until the block ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        yield
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)
