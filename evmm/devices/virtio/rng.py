"""virtio-rng (virtio 1.2 §5.4): one request queue of device-writable buffers, filled from the host's CSPRNG.

An optional rate limit (bytes per second, a token bucket refilled on the reactor) keeps one guest from
draining the host's entropy pool; requests wait, never fail, while it is empty.
"""

from __future__ import annotations

import asyncio
import os
import time

from evmm.devices.virtio.chain import InvalidChain
from evmm.devices.virtio.device import COMMON_FEATURES, VIRTIO_ID_RNG, VirtioDevice

QUEUE_SIZE = 256
MAX_REQUEST = 1 << 16  # bytes served per request at most; the driver asks again for more


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"

    def __init__(self, rate_limit: int | None = None) -> None:
        super().__init__((QUEUE_SIZE,))
        self.rate_limit = rate_limit
        self._tokens = float(rate_limit or 0)
        self._stamp = time.monotonic()
        self._retry: asyncio.TimerHandle | None = None
        self.bytes_served = 0

    def features(self) -> int:
        return COMMON_FEATURES

    def config(self) -> bytes:
        return b""  # no configuration space

    def _refill(self) -> None:
        if self.rate_limit is None:
            return
        now = time.monotonic()
        self._tokens = min(float(self.rate_limit), self._tokens + (now - self._stamp) * self.rate_limit)
        self._stamp = now

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is None or self._retry is not None:
            return
        q = ctx.queue(0)
        served = False
        self._refill()
        while True:
            chain = q.pop(ctx.mem)
            if chain is None:
                break
            if isinstance(chain, InvalidChain):
                q.add_used(chain.head, 0)
                served = True
                continue
            n = min(chain.writable_len, MAX_REQUEST)
            if self.rate_limit is not None:
                # Serve at least a tenth of a second's worth (or the whole request) at a time, so a limited
                # guest gets useful chunks rather than a byte per timer tick.
                need = min(n, max(1, self.rate_limit // 10))
                if self._tokens < need:
                    q.undo_pop()
                    wait = (need - self._tokens) / self.rate_limit
                    self._retry = ctx.reactor.call_later(wait, self._retry_now)
                    break
                n = min(n, int(self._tokens))
                self._tokens -= n
            written = chain.write(ctx.mem, os.getrandom(n)) if n else 0
            self.bytes_served += written
            q.add_used(chain.head, written)
            served = True
        if served:
            ctx.signal_used(q)

    def _retry_now(self) -> None:
        self._retry = None
        self.queue_notify(0)

    def reset(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        super().reset()
