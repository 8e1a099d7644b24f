"""virtio-net on a Linux tap: ``make_net`` turns a ``--net`` spec into a device (the board calls it)."""

from __future__ import annotations

import hashlib

from evmm.config.devspec import NetSpec
from evmm.devices.virtio.net.device import NetStats, VirtioNet
from evmm.devices.virtio.net.tap import Tap, open_tap, wrap_tap_fd
from evmm.errors import ConfigError


def default_mac(spec: NetSpec, index: int) -> bytes:
    """52:54:00:xx:xx:xx, the last three bytes from the tap name (or fd) and the NIC's index.

    0x52 has the locally-administered bit set and the multicast bit clear (IEEE 802 §9.2).  Hashing the tap name
    in, not only the index, keeps two VMs' first NICs on one bridge from sharing a MAC, and a VM keeps its MAC
    from run to run (DHCP leases, neighbour caches).
    """
    seed = f"{spec.tap if spec.tap is not None else f'fd{spec.fd}'}/{index}".encode()
    return bytes([0x52, 0x54, 0x00]) + hashlib.sha256(seed).digest()[:3]


def parse_mac(text: str) -> bytes:
    try:
        mac = bytes(int(part, 16) for part in text.split(":"))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise ConfigError(f"--net: mac={text!r} is not a MAC address like 52:54:00:12:34:56")
    return mac


def make_net(spec: NetSpec, index: int) -> VirtioNet:
    """Open (or create) the tap, or take the fd given, and build the NIC; a bad spec is one ConfigError."""
    mac = parse_mac(spec.mac) if spec.mac is not None else default_mac(spec, index)
    if spec.tap is not None:
        tap = open_tap(spec.tap)
    elif spec.fd is not None:
        tap = wrap_tap_fd(spec.fd)
    else:
        raise ConfigError("--net: give tap=NAME or fd=N")
    return VirtioNet(tap, mac, mtu=tap.mtu())


__all__ = ["NetStats", "Tap", "VirtioNet", "default_mac", "make_net", "open_tap", "parse_mac", "wrap_tap_fd"]
