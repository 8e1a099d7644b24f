"""The few Linux calls Python's ``os`` lacks, for serving a shared directory by file descriptor (ctypes).

``openat2(2)`` resolves a name under a directory fd with RESOLVE_* limits; ``renameat2(2)`` takes flags;
``linkat(2)`` and ``fchownat(2)`` take AT_EMPTY_PATH to act on an ``O_PATH`` fd itself; ``utimensat(2)``
takes UTIME_NOW / UTIME_OMIT per timestamp.  Each raises ``OSError`` with the call's errno.  ctypes releases
the GIL around every foreign call, so worker threads run them in parallel.
"""

from __future__ import annotations

import ctypes
import os

# <linux/openat2.h>
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# <linux/fcntl.h>
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
# <linux/fs.h>
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
# <linux/stat.h>: utimensat's tv_nsec special values
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_SYS_OPENAT2 = 437  # x86_64 (arch/x86/entry/syscalls/syscall_64.tbl)

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_linkat = _libc.linkat
_linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def openat2(dirfd: int, name: bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(
        _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(name),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        "openat2",
    )


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_renameat2(olddir, old, newdir, new, flags), "renameat2")


def link_fd(fd: int, newdir: int, name: bytes) -> None:
    """A new name for the inode ``fd`` (an O_PATH fd) refers to; needs CAP_DAC_READ_SEARCH (linkat(2))."""
    _check(_linkat(fd, b"", newdir, name, AT_EMPTY_PATH), "linkat")


def chown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the inode of an O_PATH fd itself, a symlink included (-1 leaves an id as it is)."""
    _check(
        _fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "fchownat",
    )


def utimens_path(path: bytes, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Set (seconds, nanoseconds) times; a nanosecond field may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_utimensat(AT_FDCWD, path, times, 0), "utimensat")
