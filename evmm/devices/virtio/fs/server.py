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

from evmm.devices.virtio.fs import fuse, hostcalls, ops
from evmm.devices.virtio.fs.base import MAX_PAGES, MAX_WRITE, Finish, Job, Reply, err
from evmm.devices.virtio.fs.files import FileOps
from evmm.devices.virtio.fs.fuse import Request
from evmm.devices.virtio.fs.inodes import InodeTable

_MUTATING = frozenset({
    fuse.SETATTR, fuse.SYMLINK, fuse.MKNOD, fuse.MKDIR, fuse.UNLINK, fuse.RMDIR, fuse.RENAME, fuse.RENAME2,
    fuse.LINK, fuse.CREATE, fuse.WRITE, fuse.SETXATTR, fuse.REMOVEXATTR, fuse.FALLOCATE,
})  # fmt: skip
# Only the user namespace is writable: security.capability or trusted.* on a host file would reach beyond
# the guest (a file capability on a host executable).
_WRITABLE_XATTR = b"user."


class FsServer(FileOps):
    def __init__(self, table: InodeTable, *, readonly: bool = False, cache: str = "auto") -> None:
        super().__init__(table, readonly=readonly, cache=cache)
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
            return err(errno.EIO)  # fuse.h: nothing before INIT
        if self.readonly and op in _MUTATING:
            return err(errno.EROFS)
        serve = self._ops.get(op)
        return serve(req, data) if serve is not None else err(errno.ENOSYS)

    def finished(self, job: Job) -> None:
        for inode in job.inodes:
            self.table.unpin(inode)
        for h in job.handles:
            self.table.unpin_handle(h)

    # ---- session ------------------------------------------------------------------------------------------

    def _init(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Init)
        if a.major != fuse.KERNEL_VERSION or a.minor < fuse.KERNEL_MINOR_VERSION:
            return err(errno.EPROTO)  # Linux has spoken 7.31 since 5.4; older drivers are not served
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
            return err(errno.EPERM)
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
            return err(errno.EINVAL)  # RENAME_WHITEOUT is overlayfs's, for a device node
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

        return self._job(work, [inode], (h,) if h is not None else ())

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
            return err(errno.EROFS)
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
            return err(errno.EOPNOTSUPP)  # no race-free way to reach a symlink's or device's xattrs
        if op in (fuse.SETXATTR, fuse.REMOVEXATTR) and not a.name.startswith(_WRITABLE_XATTR):
            return err(errno.EPERM)
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
            return err(errno.ERANGE)
        return Reply(payload=value)
