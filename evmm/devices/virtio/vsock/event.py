"""The vsock EVENT queue (virtio 1.2 §5.10.6.7), shared by both host sides (Unix socket and vhost).

Its one event is TRANSPORT_RESET: the host side lost every connection (a backend replaced, a snapshot
restored), so the driver resets its sockets and reads the guest CID again.  The driver posts 4-byte buffers;
an event raised while none is posted waits for the next kick of the queue.
"""

from __future__ import annotations

import struct

from evmm.devices.virtio.chain import DescriptorChain
from evmm.devices.virtio.device import Activation

VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0  # struct virtio_vsock_event { le32 id; }
_EVENT = struct.Struct("<I")


class EventQueue:
    def __init__(self, index: int) -> None:
        self.index = index
        self.pending = False

    def transport_reset(self, ctx: Activation) -> None:
        self.pending = True
        self.flush(ctx)

    def flush(self, ctx: Activation) -> None:
        """Deliver a pending event into the driver's next usable buffer, or ask for a kick when it has none."""
        if not self.pending:
            return
        q = ctx.queue(self.index)
        while True:
            chain = q.pop(ctx.mem)
            if chain is None:
                q.set_notification(True)  # sent when the driver posts a buffer
                return
            if isinstance(chain, DescriptorChain) and chain.writable_len >= _EVENT.size:
                chain.write(ctx.mem, _EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                q.add_used(chain.head, _EVENT.size)
                self.pending = False
                ctx.signal_used(q)
                return
            q.add_used(chain.head, 0)  # unusable buffer: give it back and try the next

    def clear(self) -> None:
        """The device was reset: the queue is gone, and so is any event for it."""
        self.pending = False
