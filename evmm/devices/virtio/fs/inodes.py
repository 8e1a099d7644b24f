"""The guest's view of the shared directory: node ids for the inodes it has looked up, file handles it opened.

As virtiofsd does, every inode the guest knows is held by an ``O_PATH`` file descriptor, and every operation
starts from one, never from a path: a rename or a symlink swapped in on either side cannot redirect it.  Node
ids are handed out from a counter and never reused; an id or handle the guest sends is looked up here, never
trusted.  One host inode ((st_dev, st_ino)) has one node id however many names reach it (hard links); the
guest's lookup count (FUSE_FORGET's ``nlookup``) says when to drop it.

Host fds are a host resource a hostile guest could exhaust with LOOKUPs and never a FORGET, so both tables
have a cap: past it, the request that would open one more fails with ENFILE.

The reactor thread owns the table.  A request served on a worker thread *pins* what it uses, so a FORGET or
RELEASE arriving meanwhile cannot close an fd the worker is still using (and so let the number be reused for
another file); the fd is closed when the last pin goes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import field

from evmm.devices.virtio.fs.fuse import ROOT_ID
from evmm.record import record

DEFAULT_MAX_INODES = 1 << 16
DEFAULT_MAX_HANDLES = 1 << 14


@record(slots=True)
class Inode:
    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int  # S_IFMT bits: the type never changes for an inode
    nlookup: int = 0
    pins: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@record(slots=True)
class FileHandle:
    fh: int
    fd: int  # opened for I/O (a directory: O_RDONLY | O_DIRECTORY)
    inode: Inode
    is_dir: bool
    pins: int = 0
    released: bool = False
    # READDIR's listing (name, d_type, ino), taken at offset 0; the offset the guest passes is an index.
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)


class InodeTable:
    def __init__(
        self,
        root_fd: int,
        root_st: os.stat_result,
        *,
        max_inodes: int = DEFAULT_MAX_INODES,
        max_handles: int = DEFAULT_MAX_HANDLES,
    ) -> None:
        self.max_inodes = max_inodes
        self.max_handles = max_handles
        self.root = Inode(ROOT_ID, root_fd, (root_st.st_dev, root_st.st_ino), stat.S_IFMT(root_st.st_mode))
        self.root.nlookup = 1  # the guest never forgets its root
        self._by_id: dict[int, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self._handles: dict[int, FileHandle] = {}
        self._next_id = ROOT_ID + 1
        self._next_fh = 1
        self.refused = 0  # lookups and opens refused by the caps

    @property
    def inodes(self) -> int:
        return len(self._by_id)

    @property
    def handles(self) -> int:
        return len(self._handles)

    def get(self, nodeid: int) -> Inode | None:
        return self._by_id.get(nodeid)

    def add_lookup(self, fd: int, st: os.stat_result) -> Inode | None:
        """Count a lookup of the inode ``fd`` (which the table now owns) refers to; None over the cap."""
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is not None:
            os.close(fd)  # the inode is held already
        elif len(self._by_id) >= self.max_inodes:
            os.close(fd)
            self.refused += 1
            return None
        else:
            inode = Inode(self._next_id, fd, key, stat.S_IFMT(st.st_mode))
            self._next_id += 1
            self._by_id[inode.nodeid] = inode
            self._by_key[key] = inode
        inode.nlookup += 1
        return inode

    def forget(self, nodeid: int, nlookup: int) -> None:
        inode = self._by_id.get(nodeid)
        if inode is None or inode is self.root:
            return
        inode.nlookup = max(inode.nlookup - nlookup, 0)
        self._maybe_drop(inode)

    def pin(self, inode: Inode) -> None:
        inode.pins += 1

    def unpin(self, inode: Inode) -> None:
        inode.pins -= 1
        self._maybe_drop(inode)

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.nlookup or inode.pins or inode is self.root:
            return
        if self._by_id.get(inode.nodeid) is inode:
            del self._by_id[inode.nodeid]
            if self._by_key.get(inode.key) is inode:
                del self._by_key[inode.key]
            os.close(inode.fd)
            inode.fd = -1

    # ---- file handles ----------------------------------------------------------------------------------

    def can_open(self) -> bool:
        if len(self._handles) < self.max_handles:
            return True
        self.refused += 1
        return False

    def add_handle(self, inode: Inode, fd: int, is_dir: bool) -> FileHandle | None:
        """Register an open file (the table owns ``fd``); None over the cap (``fd`` is closed)."""
        if not self.can_open():
            os.close(fd)
            return None
        h = FileHandle(self._next_fh, fd, inode, is_dir)
        self._next_fh += 1
        self._handles[h.fh] = h
        inode.pins += 1  # an open file keeps its inode, as an open fd keeps a host inode
        return h

    def handle(self, fh: int, is_dir: bool) -> FileHandle | None:
        h = self._handles.get(fh)
        return h if h is not None and h.is_dir == is_dir and not h.released else None

    def release(self, fh: int, is_dir: bool) -> bool:
        h = self.handle(fh, is_dir)
        if h is None:
            return False
        h.released = True
        del self._handles[fh]
        self._maybe_close(h)
        return True

    def pin_handle(self, h: FileHandle) -> None:
        h.pins += 1

    def unpin_handle(self, h: FileHandle) -> None:
        h.pins -= 1
        self._maybe_close(h)

    def _maybe_close(self, h: FileHandle) -> None:
        if h.released and not h.pins and h.fd >= 0:
            os.close(h.fd)
            h.fd = -1
            self.unpin(h.inode)

    def forget_all(self) -> None:
        """Release every handle and forget every inode but the root (DESTROY, the device's reset).  What a
        request in flight still pins is closed when that request finishes, never under it."""
        for h in list(self._handles.values()):
            self.release(h.fh, h.is_dir)
        for inode in list(self._by_id.values()):
            if inode is not self.root:
                inode.nlookup = 0
                self._maybe_drop(inode)

    def close(self) -> None:
        self.forget_all()
        if self.root.fd >= 0:
            os.close(self.root.fd)
            self.root.fd = -1
