"""virtio-blk's state for a snapshot (evmm/devices/virtio/blk/device.py).

The device itself keeps almost nothing: the request queue is in guest RAM.  What must hold is that no request
is half done: ``quiesce`` waits until every request handed to the I/O threads has completed and been
published (a worker writes straight into guest RAM, so the memory must not be saved while one runs), and the
image given at restore must be the disk the guest knew: the same size in sectors, read-only or not as
negotiated (VIRTIO_BLK_F_RO, virtio 1.2 §5.2.3).
"""

from __future__ import annotations

import asyncio
from typing import Any

from evmm.devices.virtio.blk.device import VirtioBlk
from evmm.snapshot.format import Fields, SnapshotError

VERSION = 1
QUIESCE_TIMEOUT = 30.0  # seconds for requests in flight to finish (a slow disk, a loaded test host)


async def quiesce(blk: VirtioBlk, where: str) -> None:
    """Return once no request is in flight; completions are published by the device's own reactor reader."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QUIESCE_TIMEOUT
    while blk.in_flight or blk._replacement is not None:
        if loop.time() > deadline:
            raise SnapshotError(
                f"{where}: {blk.in_flight} requests still in flight after {QUIESCE_TIMEOUT:g} s"
            )
        await asyncio.sleep(0.001)


def save(blk: VirtioBlk) -> dict[str, Any]:
    return {
        "v": VERSION,
        "capacity": blk.backend.capacity,
        "readonly": blk.backend.readonly,
        "path": str(blk.backend.path),
        "completed": blk.completed,
        "failed": blk.failed,
    }


def restore(blk: VirtioBlk, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    capacity, readonly = f.integer("capacity"), f.boolean("readonly")
    if blk.backend.capacity != capacity:
        raise SnapshotError(
            f"{where}: {blk.backend.path} has {blk.backend.capacity} sectors; the guest's disk had {capacity} "
            f"({f.text('path')})"
        )
    if blk.backend.readonly != readonly:
        was = "read-only" if readonly else "writable"
        raise SnapshotError(f"{where}: {blk.backend.path} must be attached {was}, as the guest knew it")
    blk.completed, blk.failed = f.integer("completed"), f.integer("failed")
