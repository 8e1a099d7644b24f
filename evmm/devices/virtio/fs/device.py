"""virtio-fs (virtio 1.2 §5.11): a host directory served to the guest's FUSE client by evmm itself.

Queue 0 is the hiprio queue (FORGET and BATCH_FORGET, no replies), queue 1 the request queue; the config
space is the mount tag and the number of request queues (§5.11.4).  On a kick the reactor pops each chain,
parses it (``fuse``, pure), and either answers at once (``server``: table work that cannot block) or hands
the host calls to ``IoWorkers`` threads; a job's ``finish`` runs back on the reactor, which writes the reply,
publishes the used entries and raises one interrupt per queue for the batch.  Requests are served in
parallel and out of order, as FUSE allows (each reply carries its request's ``unique``).

Reset drains as virtio-blk does: it waits for the jobs in flight, whose guest buffers the workers may still
be writing, runs their table updates (so no fd leaks) and drops their replies.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from evmm.devices.virtio.blk.backend import IoWorkers
from evmm.devices.virtio.chain import Descriptor, DescriptorChain, InvalidChain
from evmm.devices.virtio.device import COMMON_FEATURES, DeviceContext, VirtioDevice
from evmm.devices.virtio.fs import fuse
from evmm.devices.virtio.fs.base import MAX_WRITE, Finish, Job, Reply
from evmm.devices.virtio.fs.inodes import InodeTable
from evmm.devices.virtio.fs.server import FsServer
from evmm.devices.virtio.queue import QueueBroken, Virtqueue
from evmm.log import log
from evmm.memory import GuestMemory
from evmm.record import record

VIRTIO_ID_FS = 26
HIPRIO_QUEUE = 0
REQUEST_QUEUE = 1
HIPRIO_SIZE = 128
# A 1 MiB WRITE is a chain of ~258 descriptors (header, args, one per page): Linux puts it in an indirect
# table, or needs a ring that large without one.
REQUEST_SIZE = 1024
TAG_MAX = 36
IO_THREADS = 4
_CONFIG = struct.Struct("<36sI")  # struct virtio_fs_config: tag[36], num_request_queues


def _slices(mem: GuestMemory, descs: list[Descriptor], offset: int, length: int) -> list[memoryview]:
    """Views of ``length`` bytes of guest memory from ``offset`` into the buffers ``descs``."""
    out = []
    for d in descs:
        if length <= 0:
            break
        if offset >= d.length:
            offset -= d.length
            continue
        n = min(d.length - offset, length)
        out.append(mem.view(d.addr + offset, n))
        length -= n
        offset = 0
    return out


def _gather(mem: GuestMemory, descs: list[Descriptor], offset: int, length: int) -> bytes:
    views = _slices(mem, descs, offset, length)
    try:
        return b"".join(bytes(v) for v in views)
    finally:
        for v in views:
            v.release()


@record(slots=True)
class _InFlight:
    queue: int
    chain: DescriptorChain
    unique: int
    job: Job
    views: list[memoryview]


def _crashed(e: BaseException) -> Finish:
    log.warning("virtio-fs: internal error in a request: %r", e)
    return lambda: Reply(error=errno.EIO)


def _run(job: Job) -> Finish:
    """On a worker: the job's host calls; a failed call answers the request with its errno."""
    try:
        return job.work()
    except OSError as e:
        code = e.errno or errno.EIO
        return lambda: Reply(error=code)


class VirtioFs(VirtioDevice):
    device_id = VIRTIO_ID_FS
    name = "virtio-fs"

    def __init__(
        self,
        table: InodeTable,
        tag: str,
        *,
        readonly: bool = False,
        cache: str = "auto",
        io_threads: int = IO_THREADS,
    ) -> None:
        super().__init__((HIPRIO_SIZE, REQUEST_SIZE))
        self.tag = tag.encode()
        if not 0 < len(self.tag) <= TAG_MAX:
            raise ValueError(f"virtio-fs tag {tag!r} must be 1 to {TAG_MAX} bytes")
        self.table = table
        self.server = FsServer(table, readonly=readonly, cache=cache)
        self._workers: IoWorkers[Finish] = IoWorkers(io_threads, "virtio-fs", _crashed)
        self._inflight: dict[int, _InFlight] = {}
        self._next_token = 0
        self.completed = 0
        self.failed = 0  # requests answered with an error
        self.last_error: str | None = None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def features(self) -> int:
        return COMMON_FEATURES  # VIRTIO_FS_F_NOTIFICATION is not offered (Linux does not use it)

    def config(self) -> bytes:
        return _CONFIG.pack(self.tag, 1)

    def debug_state(self) -> dict[str, object]:
        return {
            "fs": {
                "tag": self.tag.decode(),
                "in_flight": self.in_flight,
                "inodes": self.table.inodes,
                "handles": self.table.handles,
                "refused_by_cap": self.table.refused,
                "completed": self.completed,
                "failed": self.failed,
                "last_error": self.last_error,
            }
        }

    # ---- the device's whole contact with the transport ---------------------------------------------------

    def activate(self, ctx: DeviceContext) -> None:
        super().activate(ctx)
        ctx.reactor.add_reader(self._workers.fd, self._on_completions)

    def queue_notify(self, index: int) -> None:
        ctx = self.ctx
        if ctx is not None and index in (HIPRIO_QUEUE, REQUEST_QUEUE):
            self._process(ctx, index)

    def _signal(self, ctx: DeviceContext, queues: set[int]) -> None:
        for index in sorted(queues):
            ctx.signal_used(index)

    def reset(self) -> None:
        ctx = self.ctx
        self._drain()
        if ctx is not None:
            ctx.reactor.remove_reader(self._workers.fd)
        self.table.forget_all()
        self.server.initialized = False
        super().reset()

    def close(self) -> None:
        if self.ctx is not None:
            self.reset()
        self._drain()
        self._workers.close()
        self.table.close()

    # ---- requests --------------------------------------------------------------------------------------------

    def _process(self, ctx: DeviceContext, index: int) -> None:
        q = ctx.queue(index)
        answered = False
        while True:
            while (chain := q.pop(ctx.mem)) is not None:
                if isinstance(chain, InvalidChain):
                    self._drop(q, chain.head, f"invalid chain: {chain.reason}")
                    answered = True
                else:
                    answered |= self._start(ctx, q, chain)
            q.set_notification(True)  # then look again: §2.7.10, buffers added before the driver saw it
            if not q.has_available():
                break
        if answered:
            self._signal(ctx, {index})

    def _start(self, ctx: DeviceContext, q: Virtqueue, chain: DescriptorChain) -> bool:
        """Begin one request; True when it was answered (or dropped) at once."""
        mem = ctx.mem
        readable, writable = chain.readable, chain.writable
        header = fuse.parse_header(_gather(mem, readable, 0, fuse.IN_HEADER.size))
        if isinstance(header, fuse.BadRequest):
            self._drop(q, chain.head, header.reason)  # no unique to answer to
            return True
        answer = fuse.has_reply(header.opcode)
        if answer and chain.writable_len < fuse.OUT_HEADER.size:
            self._drop(q, chain.head, f"request {header.unique}: no room for a reply")
            return True
        req, data = self._parse(mem, chain, header, readable, writable)
        if isinstance(req, fuse.BadRequest):
            result: Reply | Job = Reply(error=req.errno)
            if req.errno != errno.ENOSYS:
                self._note(f"request {header.unique} (opcode {header.opcode}): {req.reason}")
        else:
            try:
                result = self.server.handle(req, data)
            except Exception as e:  # a bug: this request fails, the device and the VMM go on
                log.warning(
                    "virtio-fs: internal error in request %d (opcode %d): %r", header.unique, header.opcode, e
                )
                result = Reply(error=errno.EIO)
        if isinstance(result, Reply):
            for v in data:
                v.release()
            self._reply(mem, q, chain, header.unique, result if answer else None)
            return True
        token = self._next_token
        self._next_token += 1
        self._inflight[token] = _InFlight(q.index, chain, header.unique, result, data)
        self._workers.submit(token, lambda: _run(result))
        return False

    def _parse(
        self,
        mem: GuestMemory,
        chain: DescriptorChain,
        header: fuse.InHeader,
        readable: list[Descriptor],
        writable: list[Descriptor],
    ) -> tuple[fuse.Request | fuse.BadRequest, list[memoryview]]:
        """The request's arguments, and the guest buffers its data moves through (WRITE's, READ's)."""
        base = fuse.IN_HEADER.size
        if header.length < base or header.length > chain.readable_len:
            return fuse.BadRequest(errno.EINVAL, f"header length {header.length} of {chain.readable_len}"), []
        body_len = header.length - base
        if header.opcode == fuse.WRITE:
            args = _gather(mem, readable, base, min(body_len, fuse.READ_IN_SIZE))
            req = fuse.parse_request(header, args)
            if isinstance(req, fuse.Request):
                assert isinstance(req.args, fuse.Io)
                size = req.args.size
                if size != body_len - fuse.READ_IN_SIZE or size > MAX_WRITE:
                    return fuse.BadRequest(errno.EINVAL, f"WRITE of {size} with {body_len} bytes of args"), []
                return req, _slices(mem, readable, base + fuse.READ_IN_SIZE, size)
            return req, []
        if body_len > fuse.MAX_IN_ARGS:
            return fuse.BadRequest(errno.EINVAL, f"{body_len} bytes of arguments"), []
        req = fuse.parse_request(header, _gather(mem, readable, base, body_len))
        if not isinstance(req, fuse.Request):
            return req, []
        room = chain.writable_len - fuse.OUT_HEADER.size
        a = req.args
        if isinstance(a, fuse.Io) and header.opcode in (fuse.READ, fuse.READDIR, fuse.READDIRPLUS):
            size = min(a.size, room, MAX_WRITE)
            req = fuse.Request(header, fuse.Io(a.fh, a.offset, size, a.flags))
            if header.opcode == fuse.READ:
                return req, _slices(mem, writable, fuse.OUT_HEADER.size, size)
        elif isinstance(a, fuse.Xattr) and header.opcode in (fuse.GETXATTR, fuse.LISTXATTR):
            req = fuse.Request(header, fuse.Xattr(a.name, min(a.size, room)))
        return req, []

    def _reply(
        self, mem: GuestMemory, q: Virtqueue, chain: DescriptorChain, unique: int, r: Reply | None
    ) -> None:
        if r is None:  # FORGET: nothing to write back (§5.11.6.2)
            q.add_used(chain.head, 0)
            return
        self.completed += 1
        if r.error:
            self.failed += 1
        payload = r.payload if not r.error else b""
        if fuse.OUT_HEADER.size + len(payload) + r.data_len > chain.writable_len:
            self._note(f"request {unique}: a reply of {len(payload)} bytes does not fit the guest's buffer")
            payload, r = b"", Reply(error=errno.EOVERFLOW)
        header = fuse.out_header(unique, r.error, len(payload) + (0 if r.error else r.data_len))
        chain.write(mem, header + payload)
        q.add_used(chain.head, len(header) + len(payload) + (0 if r.error else r.data_len))

    def _on_completions(self) -> None:
        ctx = self.ctx
        done = [(self._inflight.pop(token), finish) for token, finish in self._workers.collect()]
        queues: set[int] = set()
        for job, finish in done:
            reply = self._finish(job, finish)
            if ctx is None:
                continue
            try:
                self._reply(ctx.mem, ctx.queue(job.queue), job.chain, job.unique, reply)
            except QueueBroken as e:
                ctx.needs_reset(str(e))
                return
            queues.add(job.queue)
        if ctx is not None:
            self._signal(ctx, queues)

    def _finish(self, job: _InFlight, finish: Callable[[], Reply]) -> Reply:
        """On the reactor: the job's table updates, then its pins and guest buffers are let go."""
        for v in job.views:
            v.release()
        job.views.clear()
        try:
            reply = finish()
        except OSError as e:
            reply = Reply(error=e.errno or errno.EIO)
        except Exception as e:  # a bug: the request fails, the device goes on
            log.warning("virtio-fs: internal error finishing request %d: %r", job.unique, e)
            reply = Reply(error=errno.EIO)
        finally:
            self.server.finished(job.job)
        if reply.error:
            self.last_error = f"request {job.unique}: {errno.errorcode.get(reply.error, reply.error)}"
        return reply

    def _drain(self) -> None:
        while self._workers.pending:
            self._workers.wait()
            for token, finish in self._workers.collect():
                job = self._inflight.pop(token, None)
                if job is not None:
                    self._finish(job, finish)  # table updates only: the reply is dropped
        self._inflight.clear()

    def _drop(self, q: Virtqueue, head: int, why: str) -> None:
        """A chain that cannot be answered: completed with nothing written (the driver sees length 0)."""
        self.failed += 1
        self._note(why)
        q.add_used(head, 0)

    def _note(self, message: str) -> None:
        self.last_error = message
        log.debug("virtio-fs: %s", message)
