"""The FUSE wire protocol as virtio-fs carries it (Linux's include/uapi/linux/fuse.h, protocol 7.31), pure.

A request is a ``fuse_in_header`` and the operation's arguments in the device-readable part of a chain; a
reply is a ``fuse_out_header`` and its arguments in the device-writable part (virtio 1.2 §5.11.6).  This
module turns request bytes into typed requests and replies into bytes, with no I/O: every length, count and
name the guest sends is checked here, and anything malformed becomes a ``BadRequest`` carrying the errno to
answer with.  WRITE's data and READ's buffer are not bytes here: the device hands them to the file as guest
memory views, so only their lengths are checked.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from evmm.record import record

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 31  # what evmm answers INIT with; Linux 6.1 asks for 7.37 and takes the lower
ROOT_ID = 1
NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
MAX_IN_ARGS = XATTR_SIZE_MAX + XATTR_NAME_MAX + 64  # the largest non-WRITE request: SETXATTR
MAX_BATCH_FORGET = (MAX_IN_ARGS - 8) // 16

# enum fuse_opcode
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = range(8, 19)
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = range(20, 27)
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = range(27, 36)
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET = range(36, 43)
FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = range(43, 48)

# fuse_init_in/out flags
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
# fuse_setattr_in.valid
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_CTIME = 1 << 7, 1 << 8, 1 << 10
# fuse_open_out.open_flags
FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR = 1 << 0, 1 << 1, 1 << 3
GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error (negative errno), unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # struct fuse_attr, 88 bytes
_ENTRY_HEAD = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, and their nsec
_ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
_OPEN_OUT = struct.Struct("<QII")
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (7.36's flags2 and the rest ignored)
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
_KSTATFS = struct.Struct("<QQQQQIIII24x")  # 80 bytes
_DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type; the name follows, the record padded to 8
_U32_PAIR = struct.Struct("<II")
_U64 = struct.Struct("<Q")
_SETATTR = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
_READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read/write_flags, lock_owner, flags, padding
_RELEASE_IN = struct.Struct("<QIIQ")
_FH_FLAGS = struct.Struct("<QII")  # fsync_in, and flush_in's first 16 bytes
_MKNOD_IN = struct.Struct("<IIII")
_RENAME2_IN = struct.Struct("<QII")
_FALLOCATE_IN = struct.Struct("<QQQII")
_LSEEK_IN = struct.Struct("<QQII")
_GETATTR_IN = struct.Struct("<IIQ")
_CREATE_IN = struct.Struct("<IIII")
_SETXATTR_IN = struct.Struct("<II")  # size, flags (7.33's extended form only with FUSE_SETXATTR_EXT)


@record(frozen=True, slots=True)
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


@record(frozen=True, slots=True)
class BadRequest:
    errno: int
    reason: str


# ---- typed requests -------------------------------------------------------------------------------------


@record(frozen=True, slots=True)
class Init:
    major: int
    minor: int
    max_readahead: int
    flags: int


@record(frozen=True, slots=True)
class Named:
    """LOOKUP, UNLINK, RMDIR (``name``)."""

    name: bytes


@record(frozen=True, slots=True)
class Forget:
    items: tuple[tuple[int, int], ...]  # (nodeid, nlookup); FORGET's own nodeid comes from the header


@record(frozen=True, slots=True)
class Getattr:
    fh: int | None


@record(frozen=True, slots=True)
class Setattr:
    valid: int
    fh: int
    size: int
    atime: tuple[int, int]
    mtime: tuple[int, int]
    mode: int
    uid: int
    gid: int


@record(frozen=True, slots=True)
class Symlink:
    name: bytes
    target: bytes


@record(frozen=True, slots=True)
class Mknod:
    name: bytes
    mode: int
    rdev: int
    umask: int


@record(frozen=True, slots=True)
class Rename:
    name: bytes
    newdir: int
    newname: bytes
    flags: int


@record(frozen=True, slots=True)
class Link:
    oldnodeid: int
    name: bytes


@record(frozen=True, slots=True)
class Open:
    flags: int


@record(frozen=True, slots=True)
class Create:
    name: bytes
    flags: int
    mode: int
    umask: int


@record(frozen=True, slots=True)
class Io:
    """READ, WRITE, READDIR, READDIRPLUS: a handle, an offset and a size (WRITE's data follows the args)."""

    fh: int
    offset: int
    size: int
    flags: int


@record(frozen=True, slots=True)
class Handle:
    """RELEASE, RELEASEDIR, FLUSH, FSYNC, FSYNCDIR: a handle and flags."""

    fh: int
    flags: int


@record(frozen=True, slots=True)
class Xattr:
    """SETXATTR (value set), GETXATTR and LISTXATTR (size: the guest's buffer, 0 to ask the length),
    REMOVEXATTR."""

    name: bytes
    size: int
    flags: int = 0
    value: bytes = b""


@record(frozen=True, slots=True)
class Access:
    mask: int


@record(frozen=True, slots=True)
class Fallocate:
    fh: int
    offset: int
    length: int
    mode: int


@record(frozen=True, slots=True)
class Lseek:
    fh: int
    offset: int
    whence: int


@record(frozen=True, slots=True)
class NoArgs:
    """GETATTR-less operations with nothing after the header: READLINK, STATFS, DESTROY."""


Args = (
    Init
    | Named
    | Forget
    | Getattr
    | Setattr
    | Symlink
    | Mknod
    | Rename
    | Link
    | Open
    | Create
    | Io
    | Handle
    | Xattr
    | Access
    | Fallocate
    | Lseek
    | NoArgs
)


@record(frozen=True, slots=True)
class Request:
    header: InHeader
    args: Args


# ---- parsing ----------------------------------------------------------------------------------------------


def parse_header(data: bytes) -> InHeader | BadRequest:
    if len(data) < IN_HEADER.size:
        return BadRequest(errno.EINVAL, f"request of {len(data)} bytes has no fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(data)
    return InHeader(length, opcode, unique, nodeid, uid, gid, pid)


class _Malformed(Exception):
    def __init__(self, reason: str, err: int = errno.EINVAL) -> None:
        super().__init__(reason)
        self.errno = err


def _fixed(st: struct.Struct, body: bytes) -> tuple[int, ...]:
    if len(body) < st.size:
        raise _Malformed(f"arguments of {len(body)} bytes, {st.size} expected")
    return st.unpack_from(body)


def _cstr(body: bytes, start: int, what: str, limit: int) -> tuple[bytes, int]:
    """A NUL-terminated string at ``start``; returns it and the offset after its NUL."""
    end = body.find(b"\0", start)
    if end < 0:
        raise _Malformed(f"{what} is not NUL-terminated")
    if end - start > limit:
        raise _Malformed(f"{what} is {end - start} bytes, more than {limit}", errno.ENAMETOOLONG)
    return body[start:end], end + 1


def check_name(name: bytes) -> bytes:
    """A directory entry name from the guest: one component, never '.', '..', empty, or with '/'."""
    if not name or name in (b".", b".."):
        raise _Malformed(f"name {name!r} is not a plain entry name")
    if b"/" in name:
        raise _Malformed(f"name {name[:64]!r} contains '/'")
    if len(name) > NAME_MAX:
        raise _Malformed(f"name of {len(name)} bytes", errno.ENAMETOOLONG)
    return name


def _name(body: bytes, start: int = 0) -> tuple[bytes, int]:
    name, end = _cstr(body, start, "name", NAME_MAX)
    return check_name(name), end


def _parse_args(opcode: int, body: bytes) -> Args:
    if opcode in (LOOKUP, UNLINK, RMDIR):
        return Named(_name(body)[0])
    if opcode == REMOVEXATTR:
        return Xattr(_cstr(body, 0, "xattr name", XATTR_NAME_MAX)[0], 0)
    if opcode == FORGET:
        return Forget(((0, _fixed(_U64, body)[0]),))
    if opcode == BATCH_FORGET:
        count, _ = _fixed(_U32_PAIR, body)
        if count > MAX_BATCH_FORGET or len(body) < 8 + 16 * count:
            raise _Malformed(f"BATCH_FORGET of {count} in {len(body)} bytes")
        items = struct.unpack_from(f"<{2 * count}Q", body, 8)
        return Forget(tuple(zip(items[0::2], items[1::2], strict=True)))
    if opcode == GETATTR:
        flags, _, fh = _fixed(_GETATTR_IN, body)
        return Getattr(fh if flags & GETATTR_FH else None)
    if opcode == SETATTR:
        v, _, fh, size, _lo, at, mt, _ct, atn, mtn, _ctn, mode, _, uid, gid, _ = _fixed(_SETATTR, body)
        if atn >= 1_000_000_000 or mtn >= 1_000_000_000:
            raise _Malformed("SETATTR nanoseconds out of range")
        return Setattr(v, fh, size, (at, atn), (mt, mtn), mode, uid, gid)
    if opcode in (READLINK, STATFS, DESTROY):
        return NoArgs()
    if opcode == SYMLINK:
        name, end = _name(body)
        target, _ = _cstr(body, end, "symlink target", PATH_MAX - 1)
        if not target:
            raise _Malformed("empty symlink target", errno.ENOENT)
        return Symlink(name, target)
    if opcode == MKNOD:
        mode, rdev, umask, _ = _fixed(_MKNOD_IN, body)
        return Mknod(_name(body, _MKNOD_IN.size)[0], mode, rdev, umask)
    if opcode == MKDIR:
        mode, umask = _fixed(_U32_PAIR, body)
        return Mknod(_name(body, _U32_PAIR.size)[0], stat.S_IFDIR | (mode & 0o7777), 0, umask)
    if opcode in (RENAME, RENAME2):
        if opcode == RENAME:
            newdir, flags, start = _fixed(_U64, body)[0], 0, _U64.size
        else:
            newdir, flags, _ = _fixed(_RENAME2_IN, body)
            start = _RENAME2_IN.size
        old, end = _name(body, start)
        return Rename(old, newdir, _name(body, end)[0], flags)
    if opcode == LINK:
        return Link(_fixed(_U64, body)[0], _name(body, _U64.size)[0])
    if opcode in (OPEN, OPENDIR):
        return Open(_fixed(_U32_PAIR, body)[0])
    if opcode == CREATE:
        flags, mode, umask, _ = _fixed(_CREATE_IN, body)
        return Create(_name(body, _CREATE_IN.size)[0], flags, mode, umask)
    if opcode in (READ, WRITE, READDIR, READDIRPLUS):
        fh, offset, size, flags, _, _, _ = _fixed(_READ_IN, body)
        if offset >= 1 << 63:
            raise _Malformed(f"offset {offset} is negative")
        return Io(fh, offset, size, flags)
    if opcode in (RELEASE, RELEASEDIR):
        fh, flags, _, _ = _fixed(_RELEASE_IN, body)
        return Handle(fh, flags)
    if opcode in (FSYNC, FSYNCDIR, FLUSH):
        fh, flags, _ = _fixed(_FH_FLAGS, body)
        return Handle(fh, flags if opcode != FLUSH else 0)
    if opcode == SETXATTR:
        size, flags = _fixed(_SETXATTR_IN, body)
        name, end = _cstr(body, _SETXATTR_IN.size, "xattr name", XATTR_NAME_MAX)
        if size > XATTR_SIZE_MAX or len(body) < end + size:
            raise _Malformed(f"SETXATTR value of {size} bytes in {len(body) - end}", errno.E2BIG)
        return Xattr(name, size, flags, bytes(body[end : end + size]))
    if opcode == GETXATTR:
        size, _ = _fixed(_U32_PAIR, body)
        return Xattr(_cstr(body, _U32_PAIR.size, "xattr name", XATTR_NAME_MAX)[0], size)
    if opcode == LISTXATTR:
        return Xattr(b"", _fixed(_U32_PAIR, body)[0])
    if opcode == ACCESS:
        return Access(_fixed(_U32_PAIR, body)[0])
    if opcode == INIT:
        return Init(*_fixed(_INIT_IN, body))
    if opcode == FALLOCATE:
        fh, offset, length, mode, _ = _fixed(_FALLOCATE_IN, body)
        if offset >= 1 << 63 or length >= 1 << 63:
            raise _Malformed("FALLOCATE range is negative")
        return Fallocate(fh, offset, length, mode)
    if opcode == LSEEK:
        fh, offset, whence, _ = _fixed(_LSEEK_IN, body)
        return Lseek(fh, offset, whence)
    raise _Malformed(f"opcode {opcode} is not supported", errno.ENOSYS)


def parse_request(header: InHeader, body: bytes) -> Request | BadRequest:
    """The request whose header is ``header`` and whose arguments are ``body`` (WRITE: its 40-byte args)."""
    try:
        return Request(header, _parse_args(header.opcode, body))
    except _Malformed as e:
        return BadRequest(e.errno, str(e))
    except struct.error as e:  # not expected: every unpack is length-checked first
        return BadRequest(errno.EINVAL, f"malformed arguments: {e}")


def has_reply(opcode: int) -> bool:
    """FORGET and BATCH_FORGET are the only requests never answered (fuse.h: "no reply")."""
    return opcode not in (FORGET, BATCH_FORGET)


# ---- replies ----------------------------------------------------------------------------------------------


def out_header(unique: int, error: int, payload_len: int) -> bytes:
    """``error`` is a positive errno (0 for success); the wire carries it negated."""
    return OUT_HEADER.pack(OUT_HEADER.size + payload_len, -error, unique)


def _split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def _encode_dev(rdev: int) -> int:
    """A device number as the kernel's new_encode_dev packs it into 32 bits (fuse_attr.rdev)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def attr(st: os.stat_result) -> bytes:
    """struct fuse_attr from a host stat: the guest sees the host's own ids, modes, times and blocks."""
    return _ATTR.pack(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        st.st_atime_ns // 10**9,
        st.st_mtime_ns // 10**9,
        st.st_ctime_ns // 10**9,
        st.st_atime_ns % 10**9,
        st.st_mtime_ns % 10**9,
        st.st_ctime_ns % 10**9,
        st.st_mode,
        min(st.st_nlink, 0xFFFFFFFF),
        st.st_uid,
        st.st_gid,
        _encode_dev(st.st_rdev),
        st.st_blksize,
        0,
    )


def entry(nodeid: int, st: os.stat_result, entry_timeout: float, attr_timeout: float) -> bytes:
    """struct fuse_entry_out; node ids are never reused, so generation 0 keeps nodeid:generation unique."""
    e_sec, e_nsec = _split(entry_timeout)
    a_sec, a_nsec = _split(attr_timeout)
    return _ENTRY_HEAD.pack(nodeid, 0, e_sec, a_sec, e_nsec, a_nsec) + attr(st)


def attr_out(st: os.stat_result, attr_timeout: float) -> bytes:
    sec, nsec = _split(attr_timeout)
    return _ATTR_OUT_HEAD.pack(sec, nsec, 0) + attr(st)


def open_out(fh: int, open_flags: int) -> bytes:
    return _OPEN_OUT.pack(fh, open_flags, 0)


def write_out(size: int) -> bytes:
    return _U32_PAIR.pack(size, 0)


def size_out(size: int) -> bytes:
    """fuse_getxattr_out: the length an xattr call would return, for a guest that asked with size 0."""
    return _U32_PAIR.pack(size, 0)


def lseek_out(offset: int) -> bytes:
    return _U64.pack(offset)


def init_out(flags: int, max_readahead: int, max_write: int, max_pages: int) -> bytes:
    # max_background 64 and congestion_threshold 48 as libfuse's defaults; time_gran 1 ns.
    return _INIT_OUT.pack(
        KERNEL_VERSION, KERNEL_MINOR_VERSION, max_readahead, flags, 64, 48, max_write, 1, max_pages, 0, 0
    )


def statfs_out(sv: os.statvfs_result) -> bytes:
    return _KSTATFS.pack(
        sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_bsize, sv.f_namemax, sv.f_frsize, 0
    )


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def dirent_size(name: bytes, plus: bool) -> int:
    """FUSE_DIRENT_SIZE / FUSE_DIRENTPLUS_SIZE: records are padded to 8 bytes."""
    head = _ENTRY_HEAD.size + _ATTR.size if plus else 0
    return _pad8(head + _DIRENT.size + len(name))


def dirent(ino: int, next_offset: int, dtype: int, name: bytes) -> bytes:
    rec = _DIRENT.pack(ino, next_offset, len(name), dtype) + name
    return rec.ljust(_pad8(len(rec)), b"\0")


def direntplus(entry_out: bytes, ino: int, next_offset: int, dtype: int, name: bytes) -> bytes:
    """fuse_direntplus; an all-zero ``entry_out`` (node id 0) tells the kernel not to count a lookup."""
    return entry_out + dirent(ino, next_offset, dtype, name)


ENTRY_OUT_SIZE = _ENTRY_HEAD.size + _ATTR.size
ATTR_OUT_SIZE = _ATTR_OUT_HEAD.size + _ATTR.size
READ_IN_SIZE = _READ_IN.size
