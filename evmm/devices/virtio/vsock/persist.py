"""virtio-vsock's state for a snapshot, both host sides (evmm/devices/virtio/vsock/device.py, vhost.py).

Connections do not survive: their host ends (Unix sockets, or the host kernel's AF_VSOCK sockets) belong to
the old VMM.  After a restore the device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2 §5.10.6.7), and
Linux resets every vsock socket and reads the guest CID again, which for a clone is a new one.

With vhost the kernel owns the RX and TX rings, and where it stopped in them is its own: ``freeze`` stops
its rings for the moment of the snapshot (the kernel must not write guest RAM while it is saved) and reads the
next available index of each (VHOST_GET_VRING_BASE), which the saved queue state then carries; ``thaw``
starts them again where they were.  The restored device hands that index to its own kernel rings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.vsock.device import VirtioVsock
from evmm.devices.virtio.vsock.vhost import VHOST_QUEUES, VhostVsock
from evmm.snapshot.format import Fields

VERSION = 1


def save(dev: VirtioVsock | VhostVsock) -> dict[str, Any]:
    return {"v": VERSION, "cid": dev.guest_cid, "vhost": isinstance(dev, VhostVsock)}


def restore(dev: VirtioVsock | VhostVsock, data: object, where: str) -> None:
    Fields(data, where).version(VERSION).integer("cid")  # the restored device keeps its own CID (a clone's)


def after_restore(dev: VirtioVsock | VhostVsock) -> None:
    dev.transport_reset()


def freeze(dev: VirtioDevice) -> Callable[[], None]:
    """Stop everything that writes the RX ring while guest memory is saved; ``thaw`` starts it again.

    With vhost: stop the kernel's rings and move the queues' next available index to where it stopped.
    Without: the muxer's packets for the guest wait (it reads a host socket only into a guest buffer, so they
    wait in the host's socket buffers), as if the device were filling the ring already.
    """
    if isinstance(dev, VirtioVsock):
        return _hold_rx(dev)
    if not isinstance(dev, VhostVsock) or dev.ctx is None or not dev._running:
        return lambda: None
    ctx = dev.ctx
    dev._stop()
    for i in VHOST_QUEUES:
        q = ctx.queues[i]
        if q is not None and i in dev.vring_bases:
            q.next_avail = dev.vring_bases[i]

    def thaw() -> None:
        if dev.ctx is ctx:
            dev._start(ctx)

    return thaw


def _hold_rx(dev: VirtioVsock) -> Callable[[], None]:
    ctx = dev.ctx
    if ctx is None:
        return lambda: None
    dev._filling = True  # the device's own guard: a wake from the muxer then fills nothing

    def thaw() -> None:
        dev._filling = False
        if dev.ctx is ctx:
            dev._fill_rx()

    return thaw
