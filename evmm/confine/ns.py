"""The few Linux calls the jailer needs that Python 3.11's ``os`` lacks: namespaces, mounts, pivot_root.

Each raises ``OSError`` with the call and its argument in the message, so a failed step is one line.
"""

from __future__ import annotations

import ctypes
import os

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_SYS_PIVOT_ROOT = 155  # x86-64
_SYS_CLOSE_RANGE = 436

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def bind(source: str, target: str, *, readonly: bool, noexec: bool = True) -> None:
    """A non-recursive bind mount; its flags (read-only, nosuid, nodev, noexec) need a second, remount call."""
    mount(source, target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    mount(None, target, None, flags | (MS_NOEXEC if noexec else 0))


def umount_detach(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(int(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode())), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname {name}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def close_fds_except(keep: set[int]) -> None:
    """Close every fd above 2 not in ``keep`` (close_range(2) between the kept ones)."""
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > start:
            _close_range(start, fd - 1)
        start = fd + 1
    _close_range(start, 0xFFFFFFFF)


def _close_range(first: int, last: int) -> None:
    if int(_libc.syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(last), 0)) != 0:
        os.closerange(first, min(last, os.sysconf("SC_OPEN_MAX")) + 1)
