"""virtio-net's state for a snapshot (evmm/devices/virtio/net/device.py).

Receive buffers the device holds for the next frame are given back (``held``): the restored device takes them
again from the ring.  A frame read from the tap and not yet delivered is lost, as on a wire: the guest's TCP
sends again.  The tap is the one given at restore (a clone's own); the MAC in the config space is the restored
device's, which may be new (a clone): Linux reads it only at probe, so the guest keeps using its old address
until told (``ip link set dev eth0 address ...``), and the snapshot records which one the guest knew.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evmm.devices.virtio.net.device import RX, VirtioNet
from evmm.snapshot.format import Fields

VERSION = 1


def held(net: VirtioNet) -> dict[int, list[int]]:
    return {RX: [chain.head for chain in net._held]}


def freeze(net: VirtioNet) -> Callable[[], None]:
    """Stop reading the tap and sending while guest memory is saved (a frame placed meanwhile would change RAM
    behind the saved ring indices); ``thaw`` starts both again, as a backend change does."""
    ctx = net.ctx
    if ctx is None:
        return lambda: None
    net._stop_io()

    def thaw() -> None:
        if net.ctx is ctx:
            net._rx_resume()
            net._tx()

    return thaw


def save(net: VirtioNet) -> dict[str, Any]:
    return {"v": VERSION, "mac": net.mac, "mtu": net.mtu, "dropped_frame": net._pending > 0}


def restore(net: VirtioNet, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    f.blob("mac")  # the MAC the guest knew; the restored device keeps the one it was given
