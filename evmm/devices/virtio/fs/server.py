"""FUSE requests served against a shared directory: what runs on the reactor and what on a worker.

``FsServer.handle`` takes a parsed request and returns either a ``Reply`` at once (INIT, FORGET, a bad node
id, a read-only refusal: table work that cannot block) or a ``Job``: host calls for a worker thread
(``ops``), then a ``finish`` that runs back on the reactor to update the inode table and encode the reply.
The table is touched only on the reactor; a job pins the inodes and handles it uses until it is finished.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import field

from evmm.devices.virtio.fs import fuse, hostcalls, ops
from evmm.devices.virtio.fs.fuse import Request
from evmm.devices.virtio.fs.inodes import FileHandle, Inode, InodeTable
from evmm.record import record

MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
# Entry and attribute timeouts (seconds) per cache mode: none asks the host every time; auto trusts for a
# second, so host-side changes show within one (virtiofsd's "auto" too); always trusts for a day.
_TIMEOUTS = {"none": 0.0, "auto": 1.0, "always": 86400.0}
_MUTATING = frozenset({
    fuse.SETATTR, fuse.SYMLINK, fuse.MKNOD, fuse.MKDIR, fuse.UNLINK, fuse.RMDIR, fuse.RENAME, fuse.RENAME2,
    fuse.LINK, fuse.CREATE, fuse.WRITE, fuse.SETXATTR, fuse.REMOVEXATTR, fuse.FALLOCATE,
})  # fmt: skip
# Only the user namespace is writable: security.capability or trusted.* on a host file would reach beyond
# the guest (a file capability on a host executable).
_WRITABLE_XATTR = b"user."


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


def _err(code: int) -> Reply:
    return Reply(error=code)


class FsServer:
    def __init__(self, table: InodeTable, *, readonly: bool = False, cache: str = "auto") -> None:
        self.table = table
        self.readonly = readonly
        self.cache = cache
        self.timeout = _TIMEOUTS[cache]
        self.initialized = False
        self._ops: dict[int, Callable[[Request, list[memoryview]], Reply | Job]] = {
            fuse.INIT: self._init, fuse.DESTROY: self._destroy, fuse.FORGET: self._forget,
            fuse.BATCH_FORGET: self._forget, fuse.LOOKUP: self._lookup, fuse.GETATTR: self._getattr,
            fuse.SETATTR: self._setattr, fuse.READLINK: self._readlink, fuse.SYMLINK: self._symlink,
            fuse.MKNOD: self._mknod, fuse.MKDIR: self._mknod, fuse.UNLINK: self._remove,
            fuse.RMDIR: self._remove, fuse.RENAME: self._rename, fuse.RENAME2: self._rename,
            fuse.LINK: self._link, fuse.OPEN: self._open, fuse.OPENDIR: self._open,
            fuse.CREATE: self._create, fuse.READ: self._read, fuse.WRITE: self._write,
            fuse.READDIR: self._readdir, fuse.READDIRPLUS: self._readdir, fuse.RELEASE: self._release,
            fuse.RELEASEDIR: self._release, fuse.FLUSH: self._flush, fuse.FSYNC: self._fsync,
            fuse.FSYNCDIR: self._fsync, fuse.STATFS: self._statfs, fuse.ACCESS: self._access,
            fuse.GETXATTR: self._xattr, fuse.LISTXATTR: self._xattr, fuse.SETXATTR: self._xattr,
            fuse.REMOVEXATTR: self._xattr, fuse.FALLOCATE: self._fallocate, fuse.LSEEK: self._lseek,
        }  # fmt: skip

    def handle(self, req: Request, data: list[memoryview]) -> Reply | Job:
        """Serve one request; ``data`` is WRITE's payload or READ's destination (guest memory views)."""
        op = req.header.opcode
        if not self.initialized and op != fuse.INIT:
            return _err(errno.EIO)  # fuse.h: nothing before INIT
        if self.readonly and op in _MUTATING:
            return _err(errno.EROFS)
        serve = self._ops.get(op)
        return serve(req, data) if serve is not None else _err(errno.ENOSYS)

    def finished(self, job: Job) -> None:
        for inode in job.inodes:
            self.table.unpin(inode)
        for h in job.handles:
            self.table.unpin_handle(h)

    # ---- helpers ------------------------------------------------------------------------------------------

    def _job(self, work: Callable[[], Finish], inodes: list[Inode], handles: list[FileHandle] = []) -> Job:  # noqa: B006
        for inode in inodes:
            self.table.pin(inode)
        for h in handles:
            self.table.pin_handle(h)
        return Job(work, list(inodes), list(handles))

    def _node(self, nodeid: int, *, want_dir: bool = False) -> Inode | Reply:
        inode = self.table.get(nodeid)
        if inode is None:
            return _err(errno.EBADF)  # an id this device never gave, or one the guest has forgotten
        if want_dir and not inode.is_dir:
            return _err(errno.ENOTDIR)
        return inode

    def _entry_finish(self, fd: int, st: os.stat_result, extra: Callable[[], bytes] | None = None) -> Finish:
        """On the reactor: count the lookup (the table owns ``fd`` now) and answer with fuse_entry_out."""

        def finish() -> Reply:
            inode = self.table.add_lookup(fd, st)
            if inode is None:
                return _err(errno.ENFILE)
            return Reply(
                payload=fuse.entry(inode.nodeid, st, self.timeout, self.timeout) + (extra() if extra else b"")
            )

        return finish

    def _entry_job(self, inodes: list[Inode], call: Callable[[], tuple[int, os.stat_result]]) -> Job:
        def work() -> Finish:
            fd, st = call()
            return self._entry_finish(fd, st)

        return self._job(work, inodes)

    # ---- session ------------------------------------------------------------------------------------------

    def _init(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Init)
        if a.major != fuse.KERNEL_VERSION or a.minor < fuse.KERNEL_MINOR_VERSION:
            return _err(errno.EPROTO)  # Linux has spoken 7.31 since 5.4; older drivers are not served
        wanted = fuse.ASYNC_READ | fuse.BIG_WRITES | fuse.DO_READDIRPLUS | fuse.READDIRPLUS_AUTO
        wanted |= fuse.ASYNC_DIO | fuse.PARALLEL_DIROPS | fuse.MAX_PAGES | fuse.CACHE_SYMLINKS
        if self.cache != "none":
            wanted |= fuse.AUTO_INVAL_DATA  # drop cached pages when the host changed mtime or size
        self.initialized = True
        return Reply(payload=fuse.init_out(a.flags & wanted, a.max_readahead, MAX_WRITE, MAX_PAGES))

    def _destroy(self, req: Request, data: list[memoryview]) -> Reply:
        self.table.forget_all()
        self.initialized = False
        return Reply()

    def _forget(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Forget)
        for nodeid, n in a.items:
            self.table.forget(nodeid or req.header.nodeid, n)
        return Reply()

    # ---- names ----------------------------------------------------------------------------------------------

    def _lookup(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Named)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        dirfd = parent.fd
        return self._entry_job([parent], lambda: ops.lookup(dirfd, a.name))

    def _mknod(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Mknod)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        dirfd, h = parent.fd, req.header
        return self._entry_job([parent], lambda: ops.make_node(dirfd, a.name, a.mode, h.uid, h.gid))

    def _symlink(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Symlink)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        dirfd, h = parent.fd, req.header
        return self._entry_job([parent], lambda: ops.symlink(dirfd, a.name, a.target, h.uid, h.gid))

    def _link(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Link)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        old = self._node(a.oldnodeid)
        if isinstance(old, Reply):
            return old
        if old.is_dir:
            return _err(errno.EPERM)
        fd, dirfd = old.fd, parent.fd
        return self._entry_job([parent, old], lambda: ops.link(fd, dirfd, a.name))

    def _remove(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Named)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        dirfd, rmdir = parent.fd, req.header.opcode == fuse.RMDIR

        def work() -> Finish:
            if rmdir:
                os.rmdir(a.name, dir_fd=dirfd)
            else:
                os.unlink(a.name, dir_fd=dirfd)
            return Reply

        return self._job(work, [parent])

    def _rename(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Rename)
        if a.flags & ~(hostcalls.RENAME_NOREPLACE | hostcalls.RENAME_EXCHANGE):
            return _err(errno.EINVAL)  # RENAME_WHITEOUT is overlayfs's, for a device node
        old = self._node(req.header.nodeid, want_dir=True)
        if isinstance(old, Reply):
            return old
        new = self._node(a.newdir, want_dir=True)
        if isinstance(new, Reply):
            return new
        olddir, newdir = old.fd, new.fd

        def work() -> Finish:
            hostcalls.renameat2(olddir, a.name, newdir, a.newname, a.flags)
            return Reply

        return self._job(work, [old, new])

    # ---- attributes ---------------------------------------------------------------------------------------

    def _getattr(self, req: Request, data: list[memoryview]) -> Reply | Job:
        inode = self._node(req.header.nodeid)
        if isinstance(inode, Reply):
            return inode
        fd, timeout = inode.fd, self.timeout

        def work() -> Finish:
            st = os.stat(fd)
            return lambda: Reply(payload=fuse.attr_out(st, timeout))

        return self._job(work, [inode])

    def _setattr(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Setattr)
        inode = self._node(req.header.nodeid)
        if isinstance(inode, Reply):
            return inode
        h = self.table.handle(a.fh, False) if a.valid & fuse.FATTR_FH else None
        v = a.valid
        now = (0, hostcalls.UTIME_NOW)
        atime = now if v & fuse.FATTR_ATIME_NOW else a.atime if v & fuse.FATTR_ATIME else None
        mtime = now if v & fuse.FATTR_MTIME_NOW else a.mtime if v & fuse.FATTR_MTIME else None
        fd, io, timeout = inode.fd, (h.fd if h is not None else None), self.timeout

        def work() -> Finish:
            st = ops.setattr(
                fd,
                io,
                v,
                mode=a.mode if v & fuse.FATTR_MODE else -1,
                uid=a.uid if v & fuse.FATTR_UID else -1,
                gid=a.gid if v & fuse.FATTR_GID else -1,
                size=a.size if v & fuse.FATTR_SIZE else -1,
                atime=atime,
                mtime=mtime,
            )
            return lambda: Reply(payload=fuse.attr_out(st, timeout))

        return self._job(work, [inode], [h] if h is not None else [])

    def _readlink(self, req: Request, data: list[memoryview]) -> Reply | Job:
        inode = self._node(req.header.nodeid)
        if isinstance(inode, Reply):
            return inode
        fd = inode.fd

        def work() -> Finish:
            target = os.readlink(b"", dir_fd=fd)
            return lambda: Reply(payload=target)

        return self._job(work, [inode])

    def _statfs(self, req: Request, data: list[memoryview]) -> Reply | Job:
        inode = self._node(req.header.nodeid)
        if isinstance(inode, Reply):
            return inode
        fd = inode.fd

        def work() -> Finish:
            sv = os.statvfs(ops.proc_path(fd))
            return lambda: Reply(payload=fuse.statfs_out(sv))

        return self._job(work, [inode])

    def _access(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Access)
        inode = self._node(req.header.nodeid)
        if isinstance(inode, Reply):
            return inode
        if self.readonly and a.mask & os.W_OK:
            return _err(errno.EROFS)
        fd = inode.fd

        def work() -> Finish:
            os.stat(fd)  # it exists; the guest's kernel checked the mode bits (virtio-fs mounts use
            return Reply  # default_permissions), and evmm as root could do anything the mask asks

        return self._job(work, [inode])

    def _xattr(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Xattr)
        inode = self._node(req.header.nodeid)
        if isinstance(inode, Reply):
            return inode
        op = req.header.opcode
        if not (inode.is_dir or stat.S_ISREG(inode.mode)):
            return _err(errno.EOPNOTSUPP)  # no race-free way to reach a symlink's or device's xattrs
        if op in (fuse.SETXATTR, fuse.REMOVEXATTR) and not a.name.startswith(_WRITABLE_XATTR):
            return _err(errno.EPERM)
        path = ops.proc_path(inode.fd)

        def work() -> Finish:
            if op == fuse.SETXATTR:
                os.setxattr(path, a.name, a.value, a.flags)
                return Reply
            if op == fuse.REMOVEXATTR:
                os.removexattr(path, a.name)
                return Reply
            if op == fuse.GETXATTR:
                value = os.getxattr(path, a.name)
            else:
                value = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(path))
            return lambda: self._sized(value, a.size)

        return self._job(work, [inode])

    @staticmethod
    def _sized(value: bytes, size: int) -> Reply:
        """GETXATTR/LISTXATTR: size 0 asks for the length; a buffer too small is ERANGE (getxattr(2))."""
        if size == 0:
            return Reply(payload=fuse.size_out(len(value)))
        if len(value) > size:
            return _err(errno.ERANGE)
        return Reply(payload=value)

    # ---- files --------------------------------------------------------------------------------------------

    def _open(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Open)
        is_dir = req.header.opcode == fuse.OPENDIR
        inode = self._node(req.header.nodeid, want_dir=is_dir)
        if isinstance(inode, Reply):
            return inode
        if not is_dir and inode.is_dir:
            return _err(errno.EISDIR)
        if self.readonly and not ops.readonly_open(a.flags):
            return _err(errno.EROFS)
        if not self.table.can_open():
            return _err(errno.ENFILE)
        fd, mode = inode.fd, inode.mode

        def work() -> Finish:
            io = ops.reopen(fd, mode, a.flags)

            def finish() -> Reply:
                h = self.table.add_handle(inode, io, is_dir)
                if h is None:
                    return _err(errno.ENFILE)
                return Reply(payload=fuse.open_out(h.fh, self._open_flags(is_dir)))

            return finish

        return self._job(work, [inode])

    def _open_flags(self, is_dir: bool) -> int:
        if self.cache == "none":
            return 0 if is_dir else fuse.FOPEN_DIRECT_IO
        if self.cache == "always":
            return fuse.FOPEN_CACHE_DIR if is_dir else fuse.FOPEN_KEEP_CACHE
        return 0

    def _create(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Create)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        if not self.table.can_open():
            return _err(errno.ENFILE)
        dirfd, h = parent.fd, req.header

        def work() -> Finish:
            fd, st, io = ops.create(dirfd, a.name, a.flags, a.mode, h.uid, h.gid)

            def finish() -> Reply:
                inode = self.table.add_lookup(fd, st)
                if inode is None:
                    os.close(io)
                    return _err(errno.ENFILE)
                fh = self.table.add_handle(inode, io, False)
                if fh is None:
                    self.table.forget(inode.nodeid, 1)
                    return _err(errno.ENFILE)
                entry = fuse.entry(inode.nodeid, st, self.timeout, self.timeout)
                return Reply(payload=entry + fuse.open_out(fh.fh, self._open_flags(False)))

            return finish

        return self._job(work, [parent])

    def _file(self, fh: int, is_dir: bool = False) -> FileHandle | Reply:
        h = self.table.handle(fh, is_dir)
        return h if h is not None else _err(errno.EBADF)

    def _read(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Io)
        h = self._file(a.fh)
        if isinstance(h, Reply):
            return h
        io = h.fd

        def work() -> Finish:
            n = ops.read_into(io, data, a.offset)
            return lambda: Reply(data_len=n)

        return self._job(work, [], [h])

    def _write(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Io)
        h = self._file(a.fh)
        if isinstance(h, Reply):
            return h
        io = h.fd

        def work() -> Finish:
            n = ops.write_from(io, data, a.offset)
            return lambda: Reply(payload=fuse.write_out(n))

        return self._job(work, [], [h])

    def _release(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Handle)
        ok = self.table.release(a.fh, req.header.opcode == fuse.RELEASEDIR)
        return Reply() if ok else _err(errno.EBADF)

    def _flush(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Handle)
        # Called at every close(2) of the guest's file; evmm's fd stays open until RELEASE.  Nothing is
        # buffered in evmm, and POSIX locks are not offered, so there is nothing to do but check the handle.
        return Reply() if self.table.handle(a.fh, False) is not None else _err(errno.EBADF)

    def _fsync(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Handle)
        h = self._file(a.fh, req.header.opcode == fuse.FSYNCDIR)
        if isinstance(h, Reply):
            return h
        io, datasync = h.fd, bool(a.flags & fuse.FSYNC_FDATASYNC)

        def work() -> Finish:
            (os.fdatasync if datasync else os.fsync)(io)
            return Reply

        return self._job(work, [], [h])

    def _fallocate(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Fallocate)
        h = self._file(a.fh)
        if isinstance(h, Reply):
            return h
        io = h.fd

        def work() -> Finish:
            ops.fallocate(io, a.mode, a.offset, a.length)
            return Reply

        return self._job(work, [], [h])

    def _lseek(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Lseek)
        h = self._file(a.fh)
        if isinstance(h, Reply):
            return h
        if a.whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            return _err(errno.EINVAL)
        io = h.fd

        def work() -> Finish:
            pos = os.lseek(io, a.offset, a.whence)
            return lambda: Reply(payload=fuse.lseek_out(pos))

        return self._job(work, [], [h])

    # ---- directories ----------------------------------------------------------------------------------------

    def _readdir(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Io)
        h = self._file(a.fh, True)
        if isinstance(h, Reply):
            return h
        plus = req.header.opcode == fuse.READDIRPLUS
        handle, dirfd = h, h.inode.fd

        def work() -> Finish:
            entries = handle.entries
            if a.offset == 0 or not entries:
                # Listed once per pass (offset 0 is rewinddir): the offsets handed out index this listing.
                entries = ops.list_dir(handle.fd, os.stat(dirfd).st_ino)
            picked: list[tuple[int, bytes, int, int]] = []  # (index, name, d_type, ino)
            looked: dict[int, tuple[int, os.stat_result]] = {}
            room = a.size
            try:
                for i in range(a.offset, len(entries)):
                    name, dtype, ino = entries[i]
                    need = fuse.dirent_size(name, plus)
                    if need > room:
                        break
                    if plus and name not in (b".", b".."):
                        try:
                            looked[i] = ops.lookup(dirfd, name)
                        except FileNotFoundError:
                            continue  # gone since the listing
                    picked.append((i, name, dtype, ino))
                    room -= need
            except BaseException:
                for fd, _ in looked.values():
                    os.close(fd)
                raise

            def finish() -> Reply:
                handle.entries = entries
                return self._dir_reply(picked, looked, plus)

            return finish

        return self._job(work, [h.inode], [h])

    def _dir_reply(
        self,
        picked: list[tuple[int, bytes, int, int]],
        looked: dict[int, tuple[int, os.stat_result]],
        plus: bool,
    ) -> Reply:
        out = []
        for n, (i, name, dtype, ino) in enumerate(picked):
            if not plus:
                out.append(fuse.dirent(ino, i + 1, dtype, name))
                continue
            found = looked.get(i)
            entry = bytes(fuse.ENTRY_OUT_SIZE)  # '.' and '..': node id 0, no lookup counted
            if found is not None:
                inode = self.table.add_lookup(*found)
                if inode is None:
                    # Over the inode cap: stop here, closing what the rest of the listing opened.
                    for j, _name, _t, _ino in picked[n + 1 :]:
                        if j in looked:
                            os.close(looked[j][0])
                    return Reply(payload=b"".join(out)) if out else _err(errno.ENFILE)
                entry = fuse.entry(inode.nodeid, found[1], self.timeout, self.timeout)
                ino, dtype = found[1].st_ino, stat.S_IFMT(found[1].st_mode) >> 12
            out.append(fuse.direntplus(entry, ino, i + 1, dtype, name))
        return Reply(payload=b"".join(out))
