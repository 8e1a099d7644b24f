"""``/dev/vhost-vsock``: the kernel's virtio-vsock data path (drivers/vhost/vsock.c).

The kernel serves the vsock device's RX and TX virtqueues and connects the guest to AF_VSOCK sockets on this
host; evmm sets up the rings (``VhostFd``) and gives it the guest's CID.
"""

from __future__ import annotations

from typing import Self

from evmm.vhost._vhost_ffi import ffi, lib
from evmm.vhost.backend import VhostFd

VHOST_VSOCK_PATH = "/dev/vhost-vsock"


class VhostVsockFd(VhostFd):
    """An open /dev/vhost-vsock: the shared vhost set-up plus the guest CID and the device's run switch."""

    @classmethod
    def open(cls, path: str = VHOST_VSOCK_PATH) -> Self:
        return super().open(path)

    def set_guest_cid(self, cid: int) -> None:
        self._ioctl(lib.VHOST_VSOCK_SET_GUEST_CID, ffi.new("uint64_t *", cid), "VHOST_VSOCK_SET_GUEST_CID")

    def set_running(self, running: bool) -> None:
        self._ioctl(lib.VHOST_VSOCK_SET_RUNNING, ffi.new("int *", int(running)), "VHOST_VSOCK_SET_RUNNING")


__all__ = ["VHOST_VSOCK_PATH", "VhostVsockFd"]
