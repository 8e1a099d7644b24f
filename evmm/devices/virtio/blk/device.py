"""virtio-blk (virtio 1.2 §5.2): one request queue in front of a raw image, with I/O that never blocks the reactor.

On a kick the reactor pops every available chain, parses it (``request.py``, pure), answers bad requests and
GET_ID at once, and hands reads, writes, flushes, discards and write-zeroes to ``IoWorkers`` threads, which
move data straight between the image and guest RAM.  Completions come back through one eventfd; the reactor
writes each status byte, publishes the used entries, and raises ONE interrupt for the batch.  A request's
guest buffers are released before its used entry is published, and never touched after.

Reset drains: it waits for the requests in flight (their results are dropped, never written to the guest),
because a worker still writing into guest RAM after the driver reset would corrupt memory the driver has
taken back.  Hot-replace (``replace_backend``) swaps the image between requests: new requests are held in
the ring until those in flight on the old image finish, then the driver gets a config-change interrupt and
reads the new capacity (§5.2.6.2: the device MAY change capacity and SHOULD then notify).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from evmm.devices.virtio.blk.backend import FileBackend, IoWorkers
from evmm.devices.virtio.blk.request import (
    SECTOR_SHIFT,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    BadRequest,
    BlockRequest,
    Kind,
    Limits,
    parse_request,
)
from evmm.devices.virtio.chain import DescriptorChain, InvalidChain
from evmm.devices.virtio.device import (
    COMMON_FEATURES,
    CONFIG_CHANGE,
    VIRTIO_ID_BLOCK,
    Activation,
    VirtioDevice,
)
from evmm.devices.virtio.queue import QueueBroken, Virtqueue
from evmm.errors import GuestMemoryError
from evmm.record import record

# Feature bits (§5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # a direct chain also holds the header and status descriptors
SIZE_MAX = 1 << 20
BLK_SIZE = 512  # the guest's logical block size; 512 lets any image whose size is whole sectors work
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: punching a hole frees only whole file-system blocks
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
# 2, 4 and 8 threads measured the same here (2 CPUs, cached image: scripts/bench_blk.py); 4 keeps a few
# requests in flight on a slow disk without a crowd of idle threads.
IO_THREADS = 4
INLINE_READ_MAX = 128 << 10  # larger cached reads go to a worker, so the copy runs on another core

# struct virtio_blk_config (§5.2.4), 72 bytes: capacity, size_max, seg_max, geometry (c/h/s), blk_size,
# topology (physical_block_exp, alignment_offset, min_io_size, opt_io_size), writeback, unused0,
# num_queues, the discard and write-zeroes limits, write_zeroes_may_unmap, unused1[3], secure-erase limits.
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")

# What a worker hands back: status byte, bytes written into the guest's data buffers, error text.
Outcome = tuple[int, int, str]


@record(slots=True)
class _InFlight:
    head: int
    status_addr: int
    views: list[memoryview]  # guest buffers the worker reads or writes; released before the used entry


def _execute(backend: FileBackend, req: BlockRequest, views: list[memoryview]) -> Outcome:
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
        what = req.kind.name
        if req.kind in (Kind.IN, Kind.OUT):
            what += f" at sector {req.sector}"
        elif req.ranges:
            what += f" of {len(req.ranges)} ranges from sector {req.ranges[0].sector}"
        return VIRTIO_BLK_S_IOERR, 0, f"{backend.path}: {what}: {e.strerror or e}"


def _crashed(e: BaseException) -> Outcome:
    return VIRTIO_BLK_S_IOERR, 0, f"internal error: {e!r}"


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(
        self,
        backend: FileBackend,
        *,
        serial: str | None = None,
        io_threads: int = IO_THREADS,
        inline_reads: bool = True,
        on_host_error: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__((QUEUE_SIZE,))
        self.backend = backend
        self.serial = (serial or "").encode("ascii", "replace")[:VIRTIO_BLK_ID_BYTES]
        self._workers: IoWorkers[Outcome] = IoWorkers(io_threads, "virtio-blk", _crashed)
        self._inflight: dict[int, _InFlight] = {}
        self._next_token = 0
        self._replacement: FileBackend | None = None
        self.inline_reads = inline_reads  # try cached reads in place on the reactor (RWF_NOWAIT) first
        self._limits = self._make_limits(0)
        self.on_host_error = on_host_error  # told of each failing host call (the guest gets IOERR)
        self.completed = 0
        self.failed = 0
        self.last_error: str | None = None

    @property
    def in_flight(self) -> int:
        """Requests handed to the workers and not yet completed."""
        return len(self._inflight)

    # ---- what the driver sees -----------------------------------------------------------------------------

    def features(self) -> int:
        feats = (
            COMMON_FEATURES
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
        )
        return feats | (VIRTIO_BLK_F_RO if self.backend.readonly else 0)

    def config(self) -> bytes:
        return _CONFIG.pack(
            self.backend.capacity,
            SIZE_MAX,
            SEG_MAX,
            0, 0, 0,  # geometry: not offered
            BLK_SIZE,
            0, 0, 0, 0,  # topology: not offered
            0, 0,  # writeback (CONFIG_WCE not offered), unused0
            1,  # num_queues (MQ not offered)
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap: an UNMAP write-zeroes punches a hole
            0, 0, 0,  # secure erase: not offered
        )  # fmt: skip

    def _make_limits(self, features: int) -> Limits:
        return Limits(
            capacity=self.backend.capacity,
            seg_max=SEG_MAX,
            size_max=SIZE_MAX,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_DISCARD_SEG,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG,
            readonly=self.backend.readonly,
            discard=bool(features & VIRTIO_BLK_F_DISCARD),
            write_zeroes=bool(features & VIRTIO_BLK_F_WRITE_ZEROES),
        )

    # ---- lifecycle -------------------------------------------------------------------------------------

    def activate(self, ctx: Activation) -> None:
        super().activate(ctx)
        self._limits = self._make_limits(ctx.features)
        ctx.reactor.add_reader(self._workers.fd, self._on_completions)

    def reset(self) -> None:
        ctx = self.ctx
        self._drain()
        if ctx is not None:
            ctx.reactor.remove_reader(self._workers.fd)
        super().reset()
        if self._replacement is not None:
            self._swap()

    def close(self) -> None:
        if self.ctx is not None:
            self.reset()
        self._drain()
        self._workers.close()
        if self._replacement is not None:
            self._replacement.close()
            self._replacement = None
        self.backend.close()

    def _drain(self) -> None:
        """Wait for every request in flight and drop its result: nothing reaches the guest after this."""
        while self._workers.pending:
            self._workers.wait()
            for token, _outcome in self._workers.collect():
                self._release(self._inflight.pop(token, None))
        self._inflight.clear()

    # ---- hot-replace -----------------------------------------------------------------------------------

    def replace_backend(self, path: Path, readonly: bool) -> None:
        """Put another image in the drive; raises ``ConfigError`` (and keeps the old one) if it cannot open.

        The RO feature was negotiated with the old image: a read-only replacement refuses writes with IOERR
        whatever the driver believes, and a writable one is written only if the driver never saw RO.
        """
        self.replace_with(FileBackend.open(path, readonly))

    def replace_with(self, backend: FileBackend) -> None:
        if self._replacement is not None:
            self._replacement.close()  # superseded before it was ever used
        self._replacement = backend
        if not self._inflight:
            self._swap()

    def _swap(self) -> None:
        new, self._replacement = self._replacement, None
        if new is None:
            return
        old, self.backend = self.backend, new
        old.close()
        ctx = self.ctx
        self._limits = self._make_limits(ctx.features if ctx is not None else 0)
        if ctx is not None:
            ctx.interrupt.trigger(CONFIG_CHANGE)
            self._resume(ctx)  # requests held back while the old image drained

    # ---- requests --------------------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is not None and index == 0:
            self._process(ctx)

    def _resume(self, ctx: Activation) -> None:
        try:
            self._process(ctx)
        except QueueBroken as e:
            ctx.interrupt.needs_reset(str(e))

    def _process(self, ctx: Activation) -> None:
        if self._replacement is not None:
            return  # held until the old image's requests are done
        q = ctx.queue(0)
        answered = False
        while True:
            while (chain := q.pop(ctx.mem)) is not None:
                if isinstance(chain, InvalidChain):
                    self._note_error(f"invalid chain: {chain.reason}")
                    q.add_used(chain.head, 0)
                    answered = True
                else:
                    answered |= self._start(ctx, q, chain)
            # Publish avail_event (EVENT_IDX) or clear NO_NOTIFY, then look again: the driver may have added
            # buffers before it could see that we want a kick for them (§2.7.10).
            q.set_notification(True)
            if not q.has_available():
                break
        if answered:
            ctx.signal_used(q)

    def _start(self, ctx: Activation, q: Virtqueue, chain: DescriptorChain) -> bool:
        """Begin one request; True when it was answered at once (bad request, GET_ID, a cached read)."""
        req = parse_request(chain.descriptors, ctx.mem, self._limits)
        if isinstance(req, BadRequest):
            self._note_error(req.reason)
            self._finish(ctx, q, chain.head, req.status_addr, req.status, 0)
            return True
        try:
            views = [ctx.mem.view(s.addr, s.length) for s in req.data]
        except GuestMemoryError as e:  # not expected: the chain walker checked every buffer
            self._note_error(str(e))
            self._finish(ctx, q, chain.head, req.status_addr, VIRTIO_BLK_S_IOERR, 0)
            return True
        if req.kind is Kind.GET_ID:
            written = self._write_id(views)
            self._finish(ctx, q, chain.head, req.status_addr, VIRTIO_BLK_S_OK, written)
            return True
        # A cached read done in place saves the thread hop (QD1: ~2x the IOPS, scripts/bench_blk.py).
        if (
            req.kind is Kind.IN
            and self.inline_reads
            and req.data_len <= INLINE_READ_MAX
            and self.backend.read_cached(views, req.offset)
        ):
            for v in views:
                v.release()
            self._finish(ctx, q, chain.head, req.status_addr, VIRTIO_BLK_S_OK, req.data_len)
            return True
        token = self._next_token
        self._next_token += 1
        self._inflight[token] = _InFlight(chain.head, req.status_addr, views)
        backend = self.backend
        self._workers.submit(token, lambda: _execute(backend, req, views))
        return False

    def _write_id(self, views: list[memoryview]) -> int:
        """GET_ID (§5.2.6): the serial, NUL-padded to 20 bytes, cut to the driver's buffer."""
        ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        done = 0
        for v in views:
            n = min(v.nbytes, len(ident) - done)
            v[:n] = ident[done : done + n]
            done += n
            v.release()
        return done

    def _on_completions(self) -> None:
        ctx = self.ctx
        results = self._workers.collect()
        jobs = [(self._inflight.pop(token), outcome) for token, outcome in results]
        for job, _outcome in jobs:
            self._release(job)
        if ctx is None:
            return
        q = ctx.queue(0)
        for job, (status, written, error) in jobs:
            if status != VIRTIO_BLK_S_OK:
                self._note_error(error)
                if self.on_host_error is not None:
                    self.on_host_error(error)
            self._finish(ctx, q, job.head, job.status_addr, status, written)
        if results:
            ctx.signal_used(q)  # one interrupt for the whole batch
        if self._replacement is not None and not self._inflight:
            self._swap()

    @staticmethod
    def _release(job: _InFlight | None) -> None:
        if job is not None:
            for v in job.views:
                v.release()
            job.views.clear()

    def _finish(
        self, ctx: Activation, q: Virtqueue, head: int, status_addr: int | None, status: int, written: int
    ) -> None:
        if status_addr is None:
            q.add_used(head, 0)  # nowhere to put a status: the driver sees a zero-length completion
            return
        ctx.mem.write(status_addr, bytes((status,)))
        self.completed += 1
        q.add_used(head, written + 1)  # bytes written into the writable part: data, then the status byte

    def _note_error(self, message: str) -> None:
        self.failed += 1
        self.last_error = message
