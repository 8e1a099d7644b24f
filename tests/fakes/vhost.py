"""A /dev/vhost-vsock that records every ioctl, and ioeventfds without KVM, for testing the vhost-vsock device.

``FakeVhostVsock`` keeps the call sequence with its values (features, the memory table, ring addresses, the
eventfds, the CID, running on and off) and refuses what the kernel refuses (drivers/vhost/vsock.c, vhost.c):
features it did not offer, ring changes while running.  ``FakeNotifyRegistrar`` stands in for
KVM_IOEVENTFD: one eventfd per queue, which a test writes where KVM would.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from evmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from evmm.memory import MemoryRegion

VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
VHOST_F_LOG_ALL = 1 << 26
VIRTIO_F_ANY_LAYOUT = 1 << 27
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_VSOCK_F_SEQPACKET = 1 << 1

# What Linux 6.1's vhost_vsock answers to VHOST_GET_FEATURES (VHOST_VSOCK_FEATURES).
KERNEL_FEATURES = (
    VIRTIO_F_NOTIFY_ON_EMPTY
    | VIRTIO_F_INDIRECT_DESC
    | VIRTIO_F_EVENT_IDX
    | VHOST_F_LOG_ALL
    | VIRTIO_F_ANY_LAYOUT
    | VIRTIO_F_VERSION_1
    | VIRTIO_F_ACCESS_PLATFORM
    | VIRTIO_VSOCK_F_SEQPACKET
)


class FakeVhostVsock:
    def __init__(self, features: int = KERNEL_FEATURES, fail: dict[str, int] | None = None) -> None:
        self.offered = features
        self.fail = dict(fail or {})  # method name -> errno it fails with
        self.calls: list[tuple[Any, ...]] = []
        self.bases: dict[int, int] = {}  # what GET_VRING_BASE answers, per queue (default: what was set)
        self.kick: dict[int, int | None] = {}
        self.call: dict[int, int | None] = {}
        self.running = False
        self.closed = False

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if self.closed:
            raise OSError(errno.EBADF, f"{name} after close")
        if name in self.fail:
            code = self.fail[name]
            raise OSError(code, f"{name} failed: {os.strerror(code)}")

    def since(self, mark: int) -> list[tuple[Any, ...]]:
        return self.calls[mark:]

    def get_features(self) -> int:
        self._record("get_features")
        return self.offered

    def set_features(self, features: int) -> None:
        self._record("set_features", features)
        if features & ~self.offered:
            raise OSError(errno.EOPNOTSUPP, "VHOST_SET_FEATURES failed: Operation not supported")

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        self._record("set_mem_table", [(r.gpa, r.size) for r in regions])

    def _ring_change(self, name: str, *args: Any) -> None:
        self._record(name, *args)
        if self.running:
            raise OSError(errno.EBUSY, f"{name} failed: the ring is running")

    def set_vring_num(self, index: int, num: int) -> None:
        self._ring_change("set_vring_num", index, num)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        self._ring_change("set_vring_addr", index, desc, avail, used)

    def set_vring_base(self, index: int, base: int) -> None:
        self._ring_change("set_vring_base", index, base)
        self.bases.setdefault(index, base)

    def get_vring_base(self, index: int) -> int:
        self._record("get_vring_base", index)
        return self.bases.get(index, 0)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._record("set_vring_kick", index, fd)
        self.kick[index] = fd

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._record("set_vring_call", index, fd)
        self.call[index] = fd

    def set_guest_cid(self, cid: int) -> None:
        self._record("set_guest_cid", cid)

    def set_running(self, running: bool) -> None:
        self._record("set_running", running)
        self.running = running

    def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True
        self.running = False


class FakeNotifyRegistrar:
    """KVM_IOEVENTFD without KVM: ``add`` makes an eventfd per (address, queue), ``remove`` closes it."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}  # queue index -> eventfd
        self.removed: list[int] = []

    def add(self, addr: int, datamatch: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds[datamatch] = fd
        return fd

    def remove(self, addr: int, datamatch: int, fd: int) -> None:
        assert self.fds.get(datamatch) == fd
        self.removed.append(datamatch)
        os.close(fd)
