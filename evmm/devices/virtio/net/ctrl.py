"""virtio-net's control virtqueue (virtio 1.2 §5.1.6.5): the driver's commands to the device, and their acks.

Each command is one chain: the device-readable ``class``, ``command`` and command-specific data, then one
device-writable byte for the ``ack`` (VIRTIO_NET_OK or VIRTIO_NET_ERR).  evmm offers the control queue only
for multiqueue (VIRTIO_NET_F_MQ needs VIRTIO_NET_F_CTRL_VQ, §5.1.3.1), so the one command it carries out is
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; every other one is answered VIRTIO_NET_ERR (§5.1.6.5: a command the device
does not support).  Parsing is pure; ``serve`` runs on the reactor when the queue is kicked.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from evmm.devices.virtio.chain import InvalidChain
from evmm.devices.virtio.device import Activation
from evmm.devices.virtio.queue import Virtqueue
from evmm.record import record

VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
MAX_COMMAND = 4096  # readable bytes of one command evmm reads at most (MQ's is 4; MAC tables are larger)


@record(frozen=True)
class CtrlCommand:
    cls: int
    command: int
    data: bytes


def parse_command(readable: bytes) -> CtrlCommand | None:
    """The command in a chain's readable bytes, or None when there is not even a class and a command."""
    if len(readable) < 2:
        return None
    return CtrlCommand(readable[0], readable[1], bytes(readable[2:]))


def vq_pairs(cmd: CtrlCommand, max_pairs: int) -> int | None:
    """The pairs a VQ_PAIRS_SET asks for, or None when the command is not one or is out of range."""
    if (cmd.cls, cmd.command) != (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) or len(cmd.data) != 2:
        return None
    (pairs,) = struct.unpack("<H", cmd.data)
    # §5.1.6.5.5: the device MUST NOT accept a value outside 1..max_virtqueue_pairs.
    return pairs if VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= max_pairs else None


def serve(ctx: Activation, q: Virtqueue, handle: Callable[[CtrlCommand], int]) -> None:
    """Answer every command waiting on the control queue with ``handle``'s ack; one interrupt for the batch."""
    used = 0
    while (chain := q.pop(ctx.mem)) is not None:
        used += 1
        if isinstance(chain, InvalidChain) or chain.writable_len < 1 or chain.readable_len > MAX_COMMAND:
            q.add_used(chain.head, 0)  # nowhere to put an ack, or not a command: the driver sees no answer
            continue
        cmd = parse_command(chain.read_all(ctx.mem))
        ack = VIRTIO_NET_ERR if cmd is None else handle(cmd)
        written = chain.write(ctx.mem, bytes((ack,)))
        q.add_used(chain.head, written)
    if used:
        ctx.signal_used(q)


__all__ = [
    "VIRTIO_NET_CTRL_MQ",
    "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET",
    "VIRTIO_NET_ERR",
    "VIRTIO_NET_OK",
    "CtrlCommand",
    "parse_command",
    "serve",
    "vq_pairs",
]
