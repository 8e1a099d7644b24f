"""virtio-net on a Linux tap: ``make_net`` turns a ``--net`` spec into a device (the board calls it).

The device is ``VhostNet`` (the kernel's vhost-net moves the frames; one queue pair per vCPU, up to
``MAX_QUEUE_PAIRS``) where /dev/vhost-net opens, unless the spec says vhost=off; otherwise ``VirtioNet``
(evmm moves them, on the reactor, one queue pair).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from evmm.config.devspec import NetSpec
from evmm.devices.virtio.net.device import NetStats, VirtioNet
from evmm.devices.virtio.net.tap import Tap, open_tap, wrap_tap_fd
from evmm.devices.virtio.net.vhost import VhostNet, VhostNetBackend
from evmm.devices.virtio.vhost import open_error
from evmm.errors import ConfigError
from evmm.log import log

VHOST_NET_PATH = "/dev/vhost-net"  # evmm.vhost.net's, without loading the vhost bindings to say it
MAX_QUEUE_PAIRS = 8  # Linux's virtio_net uses min(pairs, online CPUs); each pair is a vhost kernel thread
VhostOpener = Callable[[], VhostNetBackend]


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


def _real_opener() -> VhostNetBackend:
    from evmm.vhost.net import VhostNetFd

    return VhostNetFd.open()


def open_vhost_net(
    what: str, want: bool | None, pairs: int, open_vhost: VhostOpener | None = None
) -> list[VhostNetBackend]:
    """Up to ``pairs`` open /dev/vhost-net, one per queue pair; none when vhost is off or, unasked for, fails.

    ``want``: True (vhost=on: a failure is a ConfigError naming it), False (none), None (where it opens; a
    failure is a debug line and evmm's own data path).  Tests pass ``open_vhost``.
    """
    if want is False:
        return []
    opener = open_vhost or _real_opener
    backends: list[VhostNetBackend] = []
    try:
        while len(backends) < pairs:
            backends.append(opener())
    except OSError as e:
        if backends:
            log.debug("%s: %d queue pairs, not %d: %s: %s", what, len(backends), pairs, VHOST_NET_PATH, e)
        elif want:
            raise open_error(what, VHOST_NET_PATH, e, "vhost=off for evmm's own data path") from None
        else:
            log.debug("%s: no vhost-net (%s), evmm moves the frames", what, e.strerror or e)
    return backends


def make_net(
    spec: NetSpec, index: int, *, cpus: int = 1, open_vhost: VhostOpener | None = None
) -> VirtioNet | VhostNet:
    """Open (or create) the tap, or take the fd given, and build the NIC; a bad spec is one ConfigError."""
    mac = parse_mac(spec.mac) if spec.mac is not None else default_mac(spec, index)
    if spec.tap is None and spec.fd is None:
        raise ConfigError("--net: give tap=NAME or fd=N")
    what = f"--net {'tap=' + spec.tap if spec.tap is not None else f'fd={spec.fd}'}"
    # One pair per vCPU where the kernel moves the frames; a passed-in fd is one tap queue.
    pairs = min(cpus, MAX_QUEUE_PAIRS) if spec.tap is not None else 1
    backends = open_vhost_net(what, spec.vhost, pairs, open_vhost)
    tap: Tap | None = None
    try:
        if spec.tap is not None:
            tap = open_tap(spec.tap, queues=max(len(backends), 1))
        else:
            assert spec.fd is not None
            tap = wrap_tap_fd(spec.fd)
        if not backends:
            return VirtioNet(tap, mac, mtu=tap.mtu())
        for b in backends[len(tap.queues) :]:
            b.close()  # a single-queue tap made beforehand: one pair
        del backends[len(tap.queues) :]
        return VhostNet(tap, mac, backends, mtu=tap.mtu())
    except OSError as e:  # the kernel refused a vhost-net query
        _close(tap, backends)
        raise ConfigError(f"{what},vhost=on: {e.strerror or e}") from None
    except BaseException:
        _close(tap, backends)
        raise


def _close(tap: Tap | None, backends: list[VhostNetBackend]) -> None:
    for b in backends:
        b.close()
    if tap is not None:
        tap.close()


__all__ = [
    "MAX_QUEUE_PAIRS",
    "NetStats",
    "Tap",
    "VhostNet",
    "VirtioNet",
    "default_mac",
    "make_net",
    "open_tap",
    "open_vhost_net",
    "parse_mac",
    "wrap_tap_fd",
]
