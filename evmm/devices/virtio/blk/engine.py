"""Where a disk's requests run once the reactor has parsed them: io_uring, or worker threads.

Reads, writes and flushes go to an io_uring ring (evmm.uring) where this host allows one: the kernel runs
them (tmpfs and other file systems that cannot do them without blocking: on its own io-wq threads), with no
Python thread and no GIL between the request and its completion, and the ring's eventfd wakes the reactor.
Discard and write-zeroes (fallocate), a request the ring has no room for, and every request where io_uring
is unavailable (disabled, or refused by a seccomp policy) run on ``IoWorkers`` threads as before; so does
the rest of a request the kernel did only part of.  Both hand back ``(token, Outcome)`` on the reactor.

Measured (scripts/bench_blk.py): a 4 KiB write to tmpfs round trip from the reactor, 26 us through the
ring against 54 us through a worker (QD1, native); see docs/performance.md for the rest.
"""

from __future__ import annotations

import functools
import os
import select
from typing import TYPE_CHECKING

from evmm.devices.virtio.blk.backend import FileBackend, IoWorkers
from evmm.devices.virtio.blk.request import (
    SECTOR_SHIFT,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    BlockRequest,
    Kind,
)
from evmm.log import log
from evmm.record import record

if TYPE_CHECKING:
    from evmm.uring import IoUring

# What a request's execution hands back: status byte, bytes written into the guest's data buffers, error text.
Outcome = tuple[int, int, str]


def _what(req: BlockRequest) -> str:
    what = req.kind.name
    if req.kind in (Kind.IN, Kind.OUT):
        what += f" at sector {req.sector}"
    elif req.ranges:
        what += f" of {len(req.ranges)} ranges from sector {req.ranges[0].sector}"
    return what


def execute(backend: FileBackend, req: BlockRequest, views: list[memoryview]) -> Outcome:
    """Carry out one request on a worker thread; host errors become IOERR for this request alone."""
    try:
        if req.kind is Kind.IN:
            backend.readv(views, req.offset)
            return VIRTIO_BLK_S_OK, req.data_len, ""
        if req.kind is Kind.OUT:
            backend.writev(views, req.offset)
        elif req.kind is Kind.FLUSH:
            backend.flush()
        elif req.kind is Kind.DISCARD:
            for r in req.ranges:
                backend.discard(r.sector << SECTOR_SHIFT, r.num_sectors << SECTOR_SHIFT)
        elif req.kind is Kind.WRITE_ZEROES:
            for r in req.ranges:
                backend.write_zeroes(r.sector << SECTOR_SHIFT, r.num_sectors << SECTOR_SHIFT, r.unmap)
        return VIRTIO_BLK_S_OK, 0, ""
    except OSError as e:
        return VIRTIO_BLK_S_IOERR, 0, f"{backend.path}: {_what(req)}: {e.strerror or e}"


def crashed(e: BaseException) -> Outcome:
    return VIRTIO_BLK_S_IOERR, 0, f"internal error: {e!r}"


@record(slots=True)
class _OnRing:
    backend: FileBackend
    req: BlockRequest
    views: list[memoryview]


class BlockIo:
    """A disk's requests in flight, on its ring or its worker threads; all calls on the reactor."""

    def __init__(self, threads: int, name: str, *, use_uring: bool = True) -> None:
        self.workers: IoWorkers[Outcome] = IoWorkers(threads, name, crashed)
        self._use_uring = use_uring
        self.ring: IoUring | None = None
        self._on_ring: dict[int, _OnRing] = {}

    def start(self) -> list[int]:
        """The eventfds that say completions are waiting (the ring's made now, on first activation)."""
        if self.ring is None and self._use_uring:
            self._use_uring = False  # one try: a host that refuses a ring refuses it every time
            try:
                from evmm.uring import IoUring

                self.ring = IoUring(128)
            except (OSError, ImportError) as e:
                log.debug("virtio-blk: no io_uring (%s); worker threads do the I/O", e)
        return [self.workers.fd] + ([self.ring.fd] if self.ring is not None else [])

    @property
    def pending(self) -> int:
        return self.workers.pending + len(self._on_ring)

    def submit(self, token: int, backend: FileBackend, req: BlockRequest, views: list[memoryview]) -> None:
        if self.ring is not None and self._queue(token, backend, req, views):
            return
        self.workers.submit(token, functools.partial(execute, backend, req, views))

    def _queue(self, token: int, backend: FileBackend, req: BlockRequest, views: list[memoryview]) -> bool:
        from evmm.uring import IOV_MAX, RingFull

        ring = self.ring
        assert ring is not None
        try:
            if req.kind is Kind.IN and 0 < len(views) <= IOV_MAX:
                ring.readv(token, backend.fd, views, req.offset)
            elif req.kind is Kind.OUT and 0 < len(views) <= IOV_MAX:
                ring.writev(token, backend.fd, views, req.offset)
            elif req.kind is Kind.FLUSH:
                ring.fsync(token, backend.fd)
            else:
                return False
        except RingFull:
            return False
        self._on_ring[token] = _OnRing(backend, req, views)
        return True

    def flush(self) -> None:
        """Hand the requests queued since the last flush to the kernel: one io_uring_enter per kick."""
        if self.ring is not None:
            try:
                self.ring.submit()
            except OSError as e:  # not expected: the kernel took the ring; it fails the requests itself
                log.warning("virtio-blk: io_uring_enter: %s", e.strerror)

    def collect(self) -> list[tuple[int, Outcome]]:
        """Every completion so far, from either engine (reactor)."""
        out = self.workers.collect()
        if self.ring is None:
            return out
        for token, res in self.ring.reap():
            job = self._on_ring.pop(token)
            want = job.req.data_len if job.req.kind in (Kind.IN, Kind.OUT) else 0
            if res == want:
                out.append((token, (VIRTIO_BLK_S_OK, want if job.req.kind is Kind.IN else 0, "")))
            elif res < 0:
                error = f"{job.backend.path}: {_what(job.req)}: {os.strerror(-res)}"
                out.append((token, (VIRTIO_BLK_S_IOERR, 0, error)))
            else:
                # Part of it (a signal, or the image ended): the worker's loop does it whole, or says why not.
                self.workers.submit(token, functools.partial(execute, job.backend, job.req, job.views))
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a completion is waiting (or ``timeout`` passes); used only to drain at reset."""
        if self.ring is not None and self._on_ring:
            self.ring.submit()
            fds = [self.workers.fd, self.ring.fd]
            return bool(select.select(fds, [], [], timeout)[0])
        return self.workers.wait(timeout)

    def close(self) -> None:
        """After ``pending`` reached 0 (the device drained): stop the threads, free the ring."""
        self.workers.close()
        if self.ring is not None:
            self.ring.close()
            self.ring = None


__all__ = ["BlockIo", "Outcome", "crashed", "execute"]
