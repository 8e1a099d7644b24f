"""The host end of virtio-net: a Linux tap device (Documentation/networking/tuntap.rst) carrying virtio-net headers.

IFF_VNET_HDR puts a ``struct virtio_net_hdr`` in front of every frame read or written, and TUNSETVNETHDRSZ 12
makes it the VERSION_1 header with ``num_buffers`` (virtio 1.2 §5.1.6) that the rings carry, so frames pass
between guest and tap unchanged.  TUNSETOFFLOAD tells the kernel which offloads the *reader* (the guest driver)
accepts: partially checksummed and TSO frames reach the guest only when it negotiated them.  Writes need no
setting: the tap takes checksum and segmentation requests from any header it is given.

The fd is non-blocking; the device registers it on the reactor.  Every failure to open or attach is a one-line
``ConfigError`` naming the tap and what to do.

A multi-queue tap (IFF_MULTI_QUEUE, Documentation/networking/tuntap.rst §3.3) is one fd per queue, each
attached with its own TUNSETIFF; the kernel spreads flows over the attached queues.  vhost-net serves one
queue pair per tap queue; TUNSETQUEUE takes a queue out of the spread (IFF_DETACH_QUEUE) while the guest
does not use its pair, and puts it back (IFF_ATTACH_QUEUE).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from evmm.confine.ioctls import SIOCGIFMTU, TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ
from evmm.devices.virtio.net import header as h
from evmm.errors import ConfigError

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>; the ioctl numbers live with the seccomp lists that name them.
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

IFNAMSIZ = 16
_IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags in the 24-byte union
_IFREQ_MTU = struct.Struct("16si20x")


def tap_offloads(features: int) -> int:
    """TUNSETOFFLOAD flags for what the driver negotiated it can receive (§5.1.3, include/uapi/linux/if_tun.h).

    TSO needs checksum offload too, on both sides: GUEST_TSO4/6 require GUEST_CSUM (§5.1.3.1), and the tap
    ignores TSO without TUN_F_CSUM.
    """
    if not features & h.VIRTIO_NET_F_GUEST_CSUM:
        return 0
    flags = TUN_F_CSUM
    if features & h.VIRTIO_NET_F_GUEST_TSO4:
        flags |= TUN_F_TSO4
    if features & h.VIRTIO_NET_F_GUEST_TSO6:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features & h.VIRTIO_NET_F_GUEST_ECN:
        flags |= TUN_F_TSO_ECN
    return flags


def _check_name(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise ConfigError(
            f"--net: tap={name!r} is not a valid interface name (1 to 15 characters, no / : or spaces)"
        )
    return raw


def _what_is(name: str) -> str:
    """Why TUNSETIFF refused an existing interface (EINVAL), from sysfs (drivers/net/tun.c tun_flags)."""
    flags = _sysfs_flags(name)
    if flags is None:
        if (Path("/sys/class/net") / name).exists():
            return f"{name} exists and is not a tap device: pick another name, and evmm creates the tap"
        return f"{name} cannot be attached as a tap"
    if flags & IFF_TUN:
        return (
            f"{name} is a tun (layer 3) device, not a tap: recreate it with `ip tuntap add {name} mode tap`"
        )
    if flags & IFF_MULTI_QUEUE:
        return (
            f"{name} is a multi-queue tap; evmm attaches single-queue taps (recreate it without multi_queue)"
        )
    return f"{name} cannot be attached as a tap"


def _sysfs_flags(name: str) -> int | None:
    try:
        return int((Path("/sys/class/net") / name / "tun_flags").read_text(), 16)
    except (OSError, ValueError):
        return None


def _attach_error(name: str, e: OSError) -> ConfigError:
    if e.errno in (errno.EPERM, errno.EACCES):
        return ConfigError(
            f"--net tap={name}: permission denied: creating a tap needs CAP_NET_ADMIN; or create it beforehand "
            f"for your user (`ip tuntap add {name} mode tap user $USER`)"
        )
    if e.errno == errno.EBUSY:
        return ConfigError(f"--net tap={name}: the tap is in use by another process")
    if e.errno == errno.EINVAL:
        return ConfigError(f"--net tap={name}: {_what_is(name)}")
    return ConfigError(f"--net tap={name}: cannot attach the tap: {e.strerror}")


class Tap:
    """An open, attached, non-blocking tap fd with 12-byte virtio-net headers (one per queue if multi-queue)."""

    def __init__(self, fd: int, name: str, more_queues: Sequence[int] = ()) -> None:
        self.fd = fd
        self.name = name
        self.queues = [fd, *more_queues]  # the fd of each queue; a single-queue tap has just ``fd``
        self.offloads = -1  # unknown until set_offload

    def set_queue_attached(self, index: int, attached: bool) -> None:
        """Put queue ``index`` of a multi-queue tap in the kernel's spread of flows, or take it out."""
        flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        fcntl.ioctl(self.queues[index], TUNSETQUEUE, _IFREQ_FLAGS.pack(b"", flags))

    def set_offload(self, flags: int) -> None:
        if flags != self.offloads:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)  # the device's setting, whichever queue sets it
            self.offloads = flags

    def mtu(self) -> int | None:
        """The tap's MTU as the host configured it, or None where this netns cannot see the tap."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                out = fcntl.ioctl(s.fileno(), SIOCGIFMTU, _IFREQ_MTU.pack(self.name.encode(), 0))
            except OSError:
                return None
        return int(_IFREQ_MTU.unpack(out)[1])

    def close(self) -> None:
        if self.fd >= 0:
            for fd in self.queues:
                os.close(fd)
            self.fd = -1
            self.queues = []

    def _setup(self) -> None:
        """What both ways of getting a tap share: header size, no offloads yet, non-blocking."""
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", h.HDR_LEN))
        self.set_offload(0)  # until a driver says what it can take (tap_offloads)
        for fd in self.queues:
            os.set_blocking(fd, False)


def open_tap(name: str, *, queues: int = 1, tun_path: str = TUN_PATH) -> Tap:
    """Attach to the tap ``name`` in this network namespace, creating it if it does not exist.

    A tap evmm creates disappears when evmm closes it; one created beforehand (``ip tuntap add``) stays.  With
    ``queues`` > 1 it is a multi-queue tap with that many queues, unless ``name`` already exists as a
    single-queue tap: that one is attached as it is (``len(tap.queues)`` says which).
    """
    raw = _check_name(name)
    fds: list[int] = []
    try:
        try:
            fds.append(_attach(name, raw, tun_path, IFF_MULTI_QUEUE if queues > 1 else 0))
        except OSError as e:
            if queues == 1 or e.errno != errno.EINVAL:
                raise _attach_error(name, e) from None
            # A single-queue tap made beforehand takes no queue with IFF_MULTI_QUEUE: attach it as it is.
            queues = 1
            try:
                fds.append(_attach(name, raw, tun_path, 0))
            except OSError as e2:
                raise _attach_error(name, e2) from None
        while len(fds) < queues:
            try:
                fds.append(_attach(name, raw, tun_path, IFF_MULTI_QUEUE))
            except OSError as e:
                raise _attach_error(name, e) from None
        tap = Tap(fds[0], _attached_name(fds[0]), fds[1:])
        try:
            tap._setup()
        except OSError as e:
            raise ConfigError(f"--net tap={name}: cannot set up the tap: {e.strerror}") from None
        return tap
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _attached_name(fd: int) -> str:
    out = fcntl.ioctl(fd, TUNGETIFF, _IFREQ_FLAGS.pack(b"", 0))
    return str(_IFREQ_FLAGS.unpack(out)[0].rstrip(b"\0").decode())


def _attach(name: str, raw: bytes, tun_path: str, extra_flags: int) -> int:
    """A /dev/net/tun fd attached to the tap (one queue of it, for a multi-queue tap).

    Opening /dev/net/tun fails with a ConfigError naming it; attaching with the OSError, for the caller.
    """
    try:
        fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"--net tap={name}: {tun_path} does not exist: load the tun module (`modprobe tun`)"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"--net tap={name}: permission denied opening {tun_path}: run evmm as root or with CAP_NET_ADMIN"
        ) from None
    except OSError as e:
        if e.errno in (errno.ENODEV, errno.ENXIO):
            raise ConfigError(f"--net tap={name}: no tun driver behind {tun_path}: `modprobe tun`") from None
        raise ConfigError(f"--net tap={name}: cannot open {tun_path}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra_flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def wrap_tap_fd(fd: int) -> Tap:
    """Take over a tap fd opened by the caller (``--net fd=N``): it must be a tap with IFF_NO_PI|IFF_VNET_HDR."""
    try:
        out = fcntl.ioctl(fd, TUNGETIFF, _IFREQ_FLAGS.pack(b"", 0))
    except OSError as e:
        if e.errno == errno.EBADF:
            raise ConfigError(f"--net fd={fd}: the fd is not open") from None
        if e.errno == errno.EBADFD:
            raise ConfigError(
                f"--net fd={fd}: a {TUN_PATH} fd not attached to any tap (TUNSETIFF first)"
            ) from None
        raise ConfigError(f"--net fd={fd}: not a tap fd ({e.strerror})") from None
    raw, flags = _IFREQ_FLAGS.unpack(out)
    name = raw.rstrip(b"\0").decode()
    # TUNGETIFF ORs IFF_NOFILTER into its answer, and IFF_NOFILTER is IFF_NO_PI's bit (drivers/net/tun.c), so
    # it cannot say whether the opener asked for IFF_NO_PI; sysfs can, where the tap is in our namespace.
    flags = _sysfs_flags(name) or flags
    if not flags & IFF_TAP:
        raise ConfigError(f"--net fd={fd}: {name} is a tun (layer 3) device, not a tap")
    missing = [n for n, bit in (("IFF_NO_PI", IFF_NO_PI), ("IFF_VNET_HDR", IFF_VNET_HDR)) if not flags & bit]
    if missing:
        raise ConfigError(
            f"--net fd={fd}: tap {name} was opened without {' and '.join(missing)}; "
            "evmm needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
        )
    tap = Tap(fd, name)
    try:
        os.set_inheritable(fd, False)
        tap._setup()
    except OSError as e:
        raise ConfigError(f"--net fd={fd}: cannot set up tap {name}: {e.strerror}") from None
    return tap


__all__ = ["TUN_PATH", "Tap", "open_tap", "tap_offloads", "wrap_tap_fd"]
