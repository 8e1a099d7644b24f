"""The FUSE operations on open files and directories: OPEN, CREATE, READ, WRITE, RELEASE, FLUSH, FSYNC,
FALLOCATE, LSEEK, READDIR and READDIRPLUS.  READ and WRITE move data between the file and the guest's buffers
(memory views the device hands in) on a worker, with no copy in between.
"""

from __future__ import annotations

import errno
import os
import stat

from evmm.devices.virtio.fs import fuse, ops
from evmm.devices.virtio.fs.base import Finish, Job, OpsBase, Reply, err
from evmm.devices.virtio.fs.fuse import Request


class FileOps(OpsBase):
    def _open(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Open)
        is_dir = req.header.opcode == fuse.OPENDIR
        inode = self._node(req.header.nodeid, want_dir=is_dir)
        if isinstance(inode, Reply):
            return inode
        if not is_dir and inode.is_dir:
            return err(errno.EISDIR)
        if self.readonly and not ops.readonly_open(a.flags):
            return err(errno.EROFS)
        if not self.table.can_open():
            return err(errno.ENFILE)
        fd, mode = inode.fd, inode.mode

        def work() -> Finish:
            io = ops.reopen(fd, mode, a.flags)

            def finish() -> Reply:
                h = self.table.add_handle(inode, io, is_dir)
                if h is None:
                    return err(errno.ENFILE)
                return Reply(payload=fuse.open_out(h.fh, self._open_flags(is_dir)))

            return finish

        return self._job(work, [inode])

    def _create(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Create)
        parent = self._node(req.header.nodeid, want_dir=True)
        if isinstance(parent, Reply):
            return parent
        if not self.table.can_open():
            return err(errno.ENFILE)
        dirfd, h = parent.fd, req.header

        def work() -> Finish:
            fd, st, io = ops.create(dirfd, a.name, a.flags, a.mode, h.uid, h.gid)

            def finish() -> Reply:
                inode = self.table.add_lookup(fd, st)
                if inode is None:
                    os.close(io)
                    return err(errno.ENFILE)
                fh = self.table.add_handle(inode, io, False)
                if fh is None:
                    self.table.forget(inode.nodeid, 1)
                    return err(errno.ENFILE)
                entry = fuse.entry(inode.nodeid, st, self.timeout, self.timeout)
                return Reply(payload=entry + fuse.open_out(fh.fh, self._open_flags(False)))

            return finish

        return self._job(work, [parent])

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

        return self._job(work, [], (h,))

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

        return self._job(work, [], (h,))

    def _release(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Handle)
        ok = self.table.release(a.fh, req.header.opcode == fuse.RELEASEDIR)
        return Reply() if ok else err(errno.EBADF)

    def _flush(self, req: Request, data: list[memoryview]) -> Reply:
        a = req.args
        assert isinstance(a, fuse.Handle)
        # Called at every close(2) of the guest's file; evmm's fd stays open until RELEASE.  Nothing is
        # buffered in evmm, and POSIX locks are not offered, so there is nothing to do but check the handle.
        return Reply() if self.table.handle(a.fh, False) is not None else err(errno.EBADF)

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

        return self._job(work, [], (h,))

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

        return self._job(work, [], (h,))

    def _lseek(self, req: Request, data: list[memoryview]) -> Reply | Job:
        a = req.args
        assert isinstance(a, fuse.Lseek)
        h = self._file(a.fh)
        if isinstance(h, Reply):
            return h
        if a.whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            return err(errno.EINVAL)
        io = h.fd

        def work() -> Finish:
            pos = os.lseek(io, a.offset, a.whence)
            return lambda: Reply(payload=fuse.lseek_out(pos))

        return self._job(work, [], (h,))

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

        return self._job(work, [h.inode], (h,))

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
                    return Reply(payload=b"".join(out)) if out else err(errno.ENFILE)
                entry = fuse.entry(inode.nodeid, found[1], self.timeout, self.timeout)
                ino, dtype = found[1].st_ino, stat.S_IFMT(found[1].st_mode) >> 12
            out.append(fuse.direntplus(entry, ino, i + 1, dtype, name))
        return Reply(payload=b"".join(out))
