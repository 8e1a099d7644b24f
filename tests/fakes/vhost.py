"""/dev/vhost-vsock and /dev/vhost-net that record every ioctl, and ioeventfds without KVM, for testing the
vhost devices.

``FakeVhostVsock`` and ``FakeVhostNet`` keep the call sequence with its values (features, the memory table,
ring addresses, the eventfds; the CID and running on and off, or each ring's tap) and refuse what the kernel
refuses (drivers/vhost/vhost.c, vsock.c, net.c): features it did not offer, ring changes while the ring is
in use.  ``FakeNotifyRegistrar`` stands in for KVM_IOEVENTFD: one eventfd per queue, which a test writes
where KVM would.
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
VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
VIRTIO_NET_F_MRG_RXBUF = 1 << 15

# What every Linux 6.1 vhost device answers to VHOST_GET_FEATURES (VHOST_FEATURES, drivers/vhost/vhost.h).
VHOST_FEATURES = (
    VIRTIO_F_NOTIFY_ON_EMPTY
    | VIRTIO_F_INDIRECT_DESC
    | VIRTIO_F_EVENT_IDX
    | VHOST_F_LOG_ALL
    | VIRTIO_F_ANY_LAYOUT
    | VIRTIO_F_VERSION_1
)
# vhost_vsock's (VHOST_VSOCK_FEATURES) and vhost_net's (VHOST_NET_FEATURES).
KERNEL_FEATURES = VHOST_FEATURES | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_VSOCK_F_SEQPACKET
NET_KERNEL_FEATURES = (
    VHOST_FEATURES | VHOST_NET_F_VIRTIO_NET_HDR | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_ACCESS_PLATFORM
)


class FakeVhost:
    """What every vhost device shares; ``busy(ring)`` says when the kernel refuses to change a ring."""

    def __init__(self, features: int, fail: dict[str, int] | None = None) -> None:
        self.offered = features
        self.fail = dict(fail or {})  # method name -> errno it fails with
        self.calls: list[tuple[Any, ...]] = []
        self.bases: dict[int, int] = {}  # what GET_VRING_BASE answers, per queue (default: what was set)
        self.kick: dict[int, int | None] = {}
        self.call: dict[int, int | None] = {}
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

    def busy(self, ring: int) -> bool:
        return False

    def _ring_change(self, name: str, ring: int, *args: Any) -> None:
        self._record(name, ring, *args)
        if self.busy(ring):
            raise OSError(errno.EBUSY, f"{name} failed: the ring is in use")

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

    def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True


class FakeVhostVsock(FakeVhost):
    """/dev/vhost-vsock: rings cannot change while the device runs (vhost_vsock_start)."""

    def __init__(self, features: int = KERNEL_FEATURES, fail: dict[str, int] | None = None) -> None:
        super().__init__(features, fail)
        self.running = False

    def busy(self, ring: int) -> bool:
        return self.running

    def set_guest_cid(self, cid: int) -> None:
        self._record("set_guest_cid", cid)

    def set_running(self, running: bool) -> None:
        self._record("set_running", running)
        self.running = running

    def close(self) -> None:
        super().close()
        self.running = False


class FakeVhostNet(FakeVhost):
    """/dev/vhost-net: two rings (0 RX, 1 TX), each with a tap fd behind it or none (VHOST_NET_SET_BACKEND);
    a ring with a backend cannot change (vhost.c: "Moving base with an active backend?")."""

    def __init__(self, features: int = NET_KERNEL_FEATURES, fail: dict[str, int] | None = None) -> None:
        super().__init__(features, fail)
        self.backend: dict[int, int | None] = {0: None, 1: None}

    def busy(self, ring: int) -> bool:
        return self.backend.get(ring) is not None

    def set_backend(self, index: int, fd: int | None) -> None:
        self._record("set_backend", index, fd)
        if index not in self.backend:
            raise OSError(errno.ENOBUFS, "VHOST_NET_SET_BACKEND failed: no such ring")
        self.backend[index] = fd

    def close(self) -> None:
        super().close()
        self.backend = {0: None, 1: None}


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


class FakeTap:
    """A tap with ``n`` queues that records offloads and queue attach/detach (TUNSETOFFLOAD, TUNSETQUEUE);
    its queue fds are eventfds (vhost is the only reader, and the fake vhost reads nothing)."""

    def __init__(self, n: int = 1) -> None:
        self.queues = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        self.fd = self.queues[0]
        self.offloads = -1
        self.attached = [True] * n  # a fresh tap's queues are all in the kernel's spread
        self.calls: list[tuple[Any, ...]] = []

    def set_offload(self, flags: int) -> None:
        self.offloads = flags

    def set_queue_attached(self, index: int, attached: bool) -> None:
        self.calls.append(("attach" if attached else "detach", index))
        if self.attached[index] == attached:
            # drivers/net/tun.c tun_set_queue: attaching an attached queue (or detaching a detached one)
            raise OSError(errno.EINVAL, "TUNSETQUEUE: Invalid argument")
        self.attached[index] = attached

    def close(self) -> None:
        for fd in self.queues:
            os.close(fd)
        self.fd = -1
        self.queues = []
