"""Queues served by the host kernel's vhost (linux/vhost.h): what every vhost device does with its rings.

A device hands a ring to vhost at DRIVER_OK (``hand_over``): its size, its three areas, the index to resume
from, the driver's notifications (the queue's ioeventfd, taken from the transport) and an eventfd for
interrupts.  At reset, or to look at the rings itself (a snapshot), it takes the ring back (``take_back``):
the kernel says where it stopped (VHOST_GET_VRING_BASE) and lets go of both eventfds.  A device-specific
step comes before taking back (vhost-vsock: SET_RUNNING 0; vhost-net: detach the tap), so the kernel is not
mid-buffer when it answers.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Protocol

from evmm.devices.virtio.device import Activation
from evmm.devices.virtio.queue import Virtqueue
from evmm.errors import ConfigError
from evmm.memory import MemoryRegion


class VhostBackend(Protocol):
    """An open /dev/vhost-* (evmm.vhost.backend.VhostFd; tests pass recording fakes, tests/fakes/vhost.py).

    Ring addresses are guest-physical: the backend translates them through the memory table it was given.
    Every method raises ``OSError`` (with the errno) when the kernel refuses.
    """

    def get_features(self) -> int: ...
    def set_features(self, features: int) -> None: ...
    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None: ...
    def set_vring_num(self, index: int, num: int) -> None: ...
    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None: ...
    def set_vring_base(self, index: int, base: int) -> None: ...
    def get_vring_base(self, index: int) -> int: ...
    def set_vring_kick(self, index: int, fd: int | None) -> None: ...
    def set_vring_call(self, index: int, fd: int | None) -> None: ...
    def close(self) -> None: ...


def hand_over(backend: VhostBackend, ring: int, q: Virtqueue, ctx: Activation) -> None:
    """Give the driver's queue ``q`` to the backend as its ring ``ring``, resuming at ``q.next_avail``.

    Kick and call are set before the device starts the ring: buffers the driver posted before DRIVER_OK are
    found by the transport's look at every queue after activation, which then kicks the kernel.
    """
    backend.set_vring_num(ring, q.size)
    backend.set_vring_addr(ring, q.desc_addr, q.avail_addr, q.used_addr)
    backend.set_vring_base(ring, q.next_avail)
    backend.set_vring_kick(ring, ctx.kicks.take(q.index))
    backend.set_vring_call(ring, ctx.interrupt.notifier(q.index))


def take_back(backend: VhostBackend, ring: int) -> int:
    """Unbind the ring's eventfds; the next avail index the kernel would have read (the ring resumes there)."""
    base = backend.get_vring_base(ring)
    backend.set_vring_kick(ring, None)
    backend.set_vring_call(ring, None)
    return base


def open_error(what: str, path: str, e: OSError, instead: str) -> ConfigError:
    """One line for a /dev/vhost-* that would not open: ``what`` the option, ``instead`` the way without it."""
    name = path.rsplit("/", 1)[-1]
    if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return ConfigError(
            f"{what}: {path} does not exist: this host's kernel has no {name} "
            f"(modprobe {name.replace('-', '_')}), or {instead}"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(f"{what}: {path}: permission denied (run as root or give this user access to it)")
    return ConfigError(f"{what}: {e.strerror or e}")


__all__ = ["VhostBackend", "hand_over", "open_error", "take_back"]
