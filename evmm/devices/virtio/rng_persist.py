"""virtio-rng's state for a snapshot (evmm/devices/virtio/rng.py): the rate limit's budget.  Requests the
limit held back are still in the ring (the device puts them back), so they are served after the restore."""

from __future__ import annotations

from typing import Any

from evmm.devices.virtio.rng import VirtioRng
from evmm.snapshot.format import Fields

VERSION = 1


def save(rng: VirtioRng) -> dict[str, Any]:
    return {"v": VERSION, "bytes_served": rng.bytes_served}


def restore(rng: VirtioRng, data: object, where: str) -> None:
    rng.bytes_served = Fields(data, where).version(VERSION).integer("bytes_served")


def after_restore(rng: VirtioRng) -> None:
    # A request the rate limit held back was waiting for a timer of the old VMM: look at the queue again.
    if rng.ctx is not None:
        rng.queue_notify(0)
