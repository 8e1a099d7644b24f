"""``/dev/vhost-net``: the kernel's virtio-net data path (drivers/vhost/net.c).

One open ``/dev/vhost-net`` serves one queue pair: its vring 0 is a receive queue and vring 1 a transmit
queue, and a kernel worker thread moves frames between them and the tap (or packet socket) given to
``VHOST_NET_SET_BACKEND``.  evmm sets up the rings (``VhostFd``) and attaches the tap's queue to each.
"""

from __future__ import annotations

from typing import Self

from evmm.vhost._vhost_ffi import ffi, lib
from evmm.vhost.backend import VhostFd

VHOST_NET_PATH = "/dev/vhost-net"


class VhostNetFd(VhostFd):
    """An open /dev/vhost-net: the shared vhost set-up plus the backend socket of each of its two rings."""

    @classmethod
    def open(cls, path: str = VHOST_NET_PATH) -> Self:
        return super().open(path)

    def set_backend(self, index: int, fd: int | None) -> None:
        """Serve ring ``index`` (0 RX, 1 TX) from the tap ``fd``; None detaches it and the ring stops.

        The kernel takes its own reference to the tap's socket, so the caller keeps owning ``fd``.
        """
        f = ffi.new("struct vhost_vring_file *", {"index": index, "fd": -1 if fd is None else fd})
        self._ioctl(lib.VHOST_NET_SET_BACKEND, f, f"VHOST_NET_SET_BACKEND (queue {index})")


__all__ = ["VHOST_NET_PATH", "VhostNetFd"]
