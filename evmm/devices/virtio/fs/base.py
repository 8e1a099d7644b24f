"""What every FUSE operation is built from: a ``Reply`` given at once, or a ``Job`` for a worker thread.

A job's ``work`` does host calls (``ops``) on a worker and returns a ``finish`` that runs back on the reactor
to update the inode table and encode the reply.  The table is touched only on the reactor; a job pins the
inodes and handles it uses until it is finished (``FsServer.finished``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import field

from evmm.devices.virtio.fs import fuse
from evmm.devices.virtio.fs.inodes import FileHandle, Inode, InodeTable
from evmm.record import record

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
# Entry and attribute timeouts (seconds) per cache mode: none asks the host every time; auto trusts for a
# second, so host-side changes show within one (virtiofsd's "auto" too); always trusts for a day.
_TIMEOUTS = {"none": 0.0, "auto": 1.0, "always": 86400.0}


@record(slots=True)
class Reply:
    error: int = 0  # a positive errno, or 0
    payload: bytes = b""
    data_len: int = 0  # bytes a worker already wrote into the guest's buffer after the payload (READ)


Finish = Callable[[], Reply]


@record(slots=True)
class Job:
    work: Callable[[], Finish]  # on a worker: host calls; returns what to do on the reactor
    inodes: list[Inode] = field(default_factory=list)  # pinned until finished
    handles: list[FileHandle] = field(default_factory=list)


def err(code: int) -> Reply:
    return Reply(error=code)


class OpsBase:
    """The table, the cache policy and the helpers the operations share."""

    def __init__(self, table: InodeTable, *, readonly: bool = False, cache: str = "auto") -> None:
        self.table = table
        self.readonly = readonly
        self.cache = cache
        self.timeout = _TIMEOUTS[cache]

    def _job(
        self, work: Callable[[], Finish], inodes: list[Inode], handles: tuple[FileHandle, ...] = ()
    ) -> Job:
        for inode in inodes:
            self.table.pin(inode)
        for h in handles:
            self.table.pin_handle(h)
        return Job(work, list(inodes), list(handles))

    def _node(self, nodeid: int, *, want_dir: bool = False) -> Inode | Reply:
        inode = self.table.get(nodeid)
        if inode is None:
            return err(errno.EBADF)  # an id this device never gave, or one the guest has forgotten
        if want_dir and not inode.is_dir:
            return err(errno.ENOTDIR)
        return inode

    def _entry_finish(self, fd: int, st: os.stat_result) -> Finish:
        """On the reactor: count the lookup (the table owns ``fd`` now) and answer with fuse_entry_out."""

        def finish() -> Reply:
            inode = self.table.add_lookup(fd, st)
            if inode is None:
                return err(errno.ENFILE)
            return Reply(payload=fuse.entry(inode.nodeid, st, self.timeout, self.timeout))

        return finish

    def _entry_job(self, inodes: list[Inode], call: Callable[[], tuple[int, os.stat_result]]) -> Job:
        def work() -> Finish:
            fd, st = call()
            return self._entry_finish(fd, st)

        return self._job(work, inodes)

    def _file(self, fh: int, is_dir: bool = False) -> FileHandle | Reply:
        h = self.table.handle(fh, is_dir)
        return h if h is not None else err(errno.EBADF)

    def _open_flags(self, is_dir: bool) -> int:
        if self.cache == "none":
            return 0 if is_dir else fuse.FOPEN_DIRECT_IO
        if self.cache == "always":
            return fuse.FOPEN_CACHE_DIR if is_dir else fuse.FOPEN_KEEP_CACHE
        return 0
