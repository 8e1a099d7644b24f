"""The host side of the FUSE operations: blocking calls on file descriptors, run on worker threads.

Every name comes from the guest and was checked by the parser (one component, never '.' or '..'); every
call resolves it relative to a directory's ``O_PATH`` fd, and ``openat2`` resolves with RESOLVE_BENEATH (no
'..' out of it, no absolute path), RESOLVE_NO_SYMLINKS (the guest's kernel resolves symlinks itself, in its
own namespace: evmm never follows one) and RESOLVE_NO_MAGICLINKS (no /proc/self/fd tricks).  An inode is
reopened for I/O through ``/proc/self/fd/N`` of evmm's own fd, as virtiofsd does: N is never guest input.

Files the guest creates get the requesting guest user's uid and gid (evmm runs as root on the host; as
another user they keep evmm's) and exactly the mode the guest asked for, whatever evmm's umask.
"""

from __future__ import annotations

import errno
import os
import stat

from evmm.devices.virtio.blk.backend import fallocate as _fallocate
from evmm.devices.virtio.fs import hostcalls

RESOLVE = hostcalls.RESOLVE_BENEATH | hostcalls.RESOLVE_NO_SYMLINKS | hostcalls.RESOLVE_NO_MAGICLINKS
# open(2) flags passed on from the guest; anything else (O_NOCTTY, O_PATH, O_TMPFILE, O_DIRECT: tmpfs and
# others refuse it, and evmm's own buffers are not aligned for it) is dropped.
OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_NOATIME
_IS_ROOT = os.geteuid() == 0
DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10


def proc_path(fd: int) -> bytes:
    return b"/proc/self/fd/%d" % fd


def lookup(dirfd: int, name: bytes) -> tuple[int, os.stat_result]:
    """An O_PATH fd for ``name`` in the directory ``dirfd`` (never following a symlink), and its stat."""
    fd = hostcalls.openat2(dirfd, name, os.O_PATH | os.O_NOFOLLOW, 0, RESOLVE)
    try:
        return fd, os.stat(fd)
    except BaseException:
        os.close(fd)
        raise


def reopen(fd: int, mode: int, flags: int) -> int:
    """Open the inode of O_PATH ``fd`` for I/O; only regular files and directories are ever opened (a guest
    that asks to open a FIFO or a device node through FUSE is refused: its own kernel opens those)."""
    if stat.S_ISDIR(mode):
        return os.open(proc_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EACCES, "not a regular file")
    return os.open(proc_path(fd), (flags & OPEN_FLAGS) | os.O_CLOEXEC)


def _owner(dirfd: int, uid: int, gid: int) -> tuple[int, int, bool]:
    """Who owns a new entry of ``dirfd``: the guest's ids, but the directory's group if it is set-group-ID
    (as Linux's inode_init_owner); the bool says a new directory inherits S_ISGID."""
    dst = os.stat(dirfd)
    if dst.st_mode & stat.S_ISGID:
        return uid, dst.st_gid, True
    return uid, gid, False


def _adopt(fd: int, mode: int, uid: int, gid: int) -> os.stat_result:
    """Give a just-created inode its owner and exact mode (the host's umask must not apply)."""
    if _IS_ROOT:
        hostcalls.chown_fd(fd, uid, gid)
    if not stat.S_ISLNK(os.stat(fd).st_mode):
        os.chmod(proc_path(fd), mode & 0o7777)
    return os.stat(fd)


def make_node(dirfd: int, name: bytes, mode: int, uid: int, gid: int) -> tuple[int, os.stat_result]:
    """MKDIR and MKNOD (regular files, FIFOs and sockets; device nodes are refused: they would give whoever
    opens them on the host the guest's choice of device)."""
    uid, gid, inherit = _owner(dirfd, uid, gid)
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        os.mkdir(name, 0o700, dir_fd=dirfd)
        mode |= stat.S_ISGID if inherit else 0
    elif kind in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
        os.mknod(name, kind | 0o600, dir_fd=dirfd)
    else:
        raise OSError(errno.EPERM, "device nodes are not created in a shared directory")
    fd, _ = lookup(dirfd, name)
    try:
        return fd, _adopt(fd, mode, uid, gid)
    except BaseException:
        os.close(fd)
        raise


def symlink(dirfd: int, name: bytes, target: bytes, uid: int, gid: int) -> tuple[int, os.stat_result]:
    uid, gid, _ = _owner(dirfd, uid, gid)
    os.symlink(target, name, dir_fd=dirfd)
    fd, st = lookup(dirfd, name)
    try:
        return fd, _adopt(fd, st.st_mode, uid, gid)
    except BaseException:
        os.close(fd)
        raise


def create(
    dirfd: int, name: bytes, flags: int, mode: int, uid: int, gid: int
) -> tuple[int, os.stat_result, int]:
    """CREATE: (O_PATH fd, stat, fd open for I/O).  The file is adopted only if this call made it."""
    uid, gid, _ = _owner(dirfd, uid, gid)
    oflags = (flags & OPEN_FLAGS) | os.O_NOFOLLOW
    try:
        io = hostcalls.openat2(dirfd, name, oflags | os.O_CREAT | os.O_EXCL, 0o600, RESOLVE)
        made = True
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        io = hostcalls.openat2(dirfd, name, oflags, 0, RESOLVE)
        made = False
    try:
        fd, st = lookup(dirfd, name)
        if os.fstat(io).st_ino != st.st_ino:
            os.close(fd)
            raise OSError(errno.EAGAIN, "the entry changed while it was created")
        if made:
            st = _adopt(fd, stat.S_IFREG | mode, uid, gid)
        return fd, st, io
    except BaseException:
        os.close(io)
        raise


def link(fd: int, dirfd: int, name: bytes) -> tuple[int, os.stat_result]:
    try:
        hostcalls.link_fd(fd, dirfd, name)
    except PermissionError:
        if _IS_ROOT:
            raise
        # linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; without it, through evmm's own /proc fd.
        os.link(proc_path(fd), name, dst_dir_fd=dirfd, follow_symlinks=True)
    return lookup(dirfd, name)


def setattr(
    fd: int,
    io: int | None,
    valid: int,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    atime: tuple[int, int] | None,
    mtime: tuple[int, int] | None,
) -> os.stat_result:
    """SETATTR's parts in chmod, chown, truncate, utimes order (as the kernel's notify_change)."""
    kind = stat.S_IFMT(os.stat(fd).st_mode)
    if mode >= 0:
        if kind == stat.S_IFLNK:
            raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
        os.chmod(proc_path(fd), mode & 0o7777)
    if uid >= 0 or gid >= 0:
        hostcalls.chown_fd(fd, uid, gid)
    if size >= 0:
        if io is not None:
            os.ftruncate(io, size)
        elif kind == stat.S_IFREG:
            os.truncate(proc_path(fd), size)
        else:
            raise OSError(errno.EINVAL if kind != stat.S_IFDIR else errno.EISDIR, "not a regular file")
    if atime is not None or mtime is not None:
        omit = (0, hostcalls.UTIME_OMIT)
        # The magic link names the inode itself, a symlink included (utimensat follows it to there, no further).
        hostcalls.utimens_path(proc_path(fd), atime or omit, mtime or omit)
    return os.stat(fd)


def read_into(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill ``views`` (guest memory) from the file at ``offset``; fewer bytes only at the end of the file."""
    done = 0
    while views:
        n = os.preadv(fd, views, offset + done)
        if n == 0:
            break
        done += n
        views = _advance(views, n)
    return done


def write_from(fd: int, views: list[memoryview], offset: int) -> int:
    done = 0
    while views:
        n = os.pwritev(fd, views, offset + done)
        if n == 0:
            break
        done += n
        views = _advance(views, n)
    return done


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def list_dir(io: int, self_ino: int) -> list[tuple[bytes, int, int]]:
    """(name, d_type, ino) of every entry, '.' and '..' first (Linux's getdents shows them too)."""
    out = [(b".", DT_DIR, self_ino), (b"..", DT_DIR, self_ino)]
    with os.scandir(io) as it:
        for e in it:
            if e.is_symlink():
                dtype = DT_LNK
            elif e.is_dir(follow_symlinks=False):
                dtype = DT_DIR
            elif e.is_file(follow_symlinks=False):
                dtype = DT_REG
            else:
                dtype = DT_UNKNOWN  # the guest looks it up for the type (FIFOs, sockets)
            out.append((os.fsencode(e.name), dtype, e.inode()))
    return out


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _fallocate(fd, mode, offset, length)


def readonly_open(flags: int) -> bool:
    return (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_TRUNC
