"""A virtio-mmio transport's and its queues' state for a snapshot (evmm/devices/virtio/mmio.py, queue.py).

Saved: the registers the driver programmed (status, feature selectors and the accepted features, the queue
selector, each queue's size, ring addresses and ready bit), InterruptStatus, the config generation, and for
each live queue the device's side of the rings (virtio 1.2 §2.7): the next available index it will take, the
next used index it will fill, the used index of its last interrupt (EVENT_IDX suppression, §2.7.10) and
whether it asked for kicks.  The rings themselves are in guest RAM, which the snapshot keeps.

A buffer the device has taken and not returned cannot be carried over: the new device knows nothing of it,
and the driver would wait for it forever.  So a device finishes its requests before a snapshot (blk), and a
device that holds buffers for later (virtio-net's receive buffers waiting for a frame) names them: if they
are the last it took, the saved next-available index goes back over them and the restored device takes them
again (§2.7.13: until used, a buffer stays the driver's offer).  Anything else in flight refuses the snapshot.

On restore the transport takes the saved registers, builds the queues with the saved indices and activates
the device as a DRIVER_OK write would, then re-raises an interrupt the driver had not yet acknowledged.
"""

from __future__ import annotations

from typing import Any

from evmm.devices.virtio.mmio import VirtioMmio
from evmm.devices.virtio.queue import Virtqueue
from evmm.devices.virtio.transport import DEVICE_NEEDS_RESET, DRIVER_OK
from evmm.snapshot.format import Fields, SnapshotError

VERSION = 1


def _queue_state(q: Virtqueue, held: list[int], where: str) -> dict[str, Any]:
    in_flight = set(q._in_flight)
    next_avail = q.next_avail
    if held:
        # The held heads must be the last ones taken, in order: then giving them back is moving the index.
        taken = [q._avail16[2 + (next_avail - len(held) + i) % q.size] for i in range(len(held))]
        if taken != held:
            raise SnapshotError(f"{where}: queue {q.index} holds buffers out of order; cannot snapshot it")
        next_avail = (next_avail - len(held)) & 0xFFFF
        in_flight -= set(held)
    if in_flight:
        raise SnapshotError(
            f"{where}: queue {q.index} has {len(in_flight)} requests in flight; cannot snapshot it now"
        )
    return {
        "next_avail": next_avail,
        "next_used": q.next_used,
        "signalled_used": -1 if q._signalled_used is None else q._signalled_used,
        "notify": q._notify,
    }


def save(
    t: VirtioMmio, device_state: dict[str, Any], where: str, held: dict[int, list[int]]
) -> dict[str, Any]:
    """``held``: for each queue, the heads the device keeps for later, in the order it took them."""
    return {
        "v": VERSION,
        "device_id": t.device.device_id,
        "queue_count": len(t.device.queue_sizes),
        "status": t.core.status,
        "device_features_sel": t.device_features_sel,
        "driver_features_sel": t.driver_features_sel,
        "driver_features": t.core.driver_features,
        "queue_sel": t.queue_sel,
        "interrupt_status": t.interrupt_status,
        "config_generation": t.core.config_generation,
        "queues": [
            {
                "size": c.size,
                "desc": c.desc_addr,
                "avail": c.avail_addr,
                "used": c.used_addr,
                "ready": c.ready,
            }
            for c in t.queues
        ],
        "active": [
            None if q is None else _queue_state(q, held.get(q.index, []), where) for q in t.core.active
        ],
        "device": device_state,
    }


def restore_registers(t: VirtioMmio, data: object, where: str) -> Fields:
    """Put the saved registers into a fresh transport; its device's own state comes next (``activate``)."""
    f = Fields(data, where).version(VERSION)
    if f.integer("device_id") != t.device.device_id or f.integer("queue_count") != len(t.device.queue_sizes):
        raise SnapshotError(
            f"{where}: the snapshot has a device of type {f.integer('device_id')} with {f.integer('queue_count')} "
            f"queues here; the restored machine has {t.device.name}"
        )
    queues = [Fields(q, f"{where}: queue {i}") for i, q in enumerate(f.items("queues"))]
    if len(queues) != len(t.queues):
        raise SnapshotError(f"{where}: {len(queues)} queues saved, the device has {len(t.queues)}")
    t.core.status = f.integer("status") & 0xFF
    t.device_features_sel = f.integer("device_features_sel")
    t.driver_features_sel = f.integer("driver_features_sel")
    t.core.driver_features = f.integer("driver_features") & ((1 << 64) - 1)
    t.queue_sel = f.integer("queue_sel")
    t.core.config_generation = f.integer("config_generation") & 0xFFFFFFFF
    t.interrupt_status = f.integer("interrupt_status") & 0x3  # on the reactor, the vCPUs stopped
    for cfg, q in zip(t.queues, queues, strict=True):
        cfg.size = q.integer("size")
        cfg.desc_addr, cfg.avail_addr, cfg.used_addr = (
            q.integer("desc"),
            q.integer("avail"),
            q.integer("used"),
        )
        cfg.ready = q.boolean("ready")
    return f


def activate(t: VirtioMmio, f: Fields) -> None:
    """Start the device on the restored queues, as the driver's DRIVER_OK did before the snapshot."""
    active = f.items("active")
    if len(active) != len(t.queues):
        raise SnapshotError(f"{f.where}: {len(active)} queue states saved, the device has {len(t.queues)}")
    states: dict[int, Fields] = {
        i: Fields(a, f"{f.where}: queue {i}") for i, a in enumerate(active) if a is not None
    }
    indices = {i: (s.integer("next_avail", 0xFFFF), s.integer("next_used", 0xFFFF), s.integer("signalled_used"), s.boolean("notify"))
               for i, s in states.items()}  # fmt: skip
    if not t.core.status & DRIVER_OK or t.core.status & DEVICE_NEEDS_RESET:
        return  # not started, or broken: the driver will reset it, and nothing runs until then

    def prepare(q: Virtqueue) -> None:
        saved = indices.get(q.index)
        if saved is None:
            return
        q.next_avail, q.next_used, signalled, q._notify = saved
        q._signalled_used = None if signalled < 0 else signalled & 0xFFFF

    missing = [i for i, c in enumerate(t.queues) if c.ready and i not in indices]
    if missing:
        raise SnapshotError(f"{f.where}: queue {missing[0]} is ready but has no saved state")
    t.core.activate(prepare)
    if t.interrupt_status:
        # The driver had not acknowledged it when the VM stopped; the new VM's irqfd never saw it.
        t._irq.trigger()


__all__ = ["activate", "restore_registers", "save"]
