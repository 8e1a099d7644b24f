"""virtio-fs: a host directory shared with the guest (virtio 1.2 §5.11), served by evmm itself, no virtiofsd.

``make_fs`` is what the board builder calls for each ``--fs``; the parts are ``fuse`` (the FUSE wire format,
pure), ``inodes`` (node ids and file handles over O_PATH fds, with caps), ``ops`` (the host calls, on worker
threads), ``server`` (each request: on the reactor or as a job), ``hostcalls`` (openat2 and friends) and
``device`` (the virtio device).  docs/virtio-fs.md has the design and the safety model.
"""

from __future__ import annotations

import os
import resource
import stat

from evmm.devices.virtio.fs.device import VirtioFs
from evmm.devices.virtio.fs.inodes import DEFAULT_MAX_HANDLES, DEFAULT_MAX_INODES, InodeTable
from evmm.errors import ConfigError
from evmm.machine.devspec import FsSpec

# Host fds evmm keeps for itself (guest RAM, KVM, eventfds, sockets, drives) out of every share's budget.
_RESERVED_FDS = 1024


def _fd_budget() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (the default soft 1024 is far below what a guest's
    dentry cache holds) and return how many fds the shares may use between them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(soft - _RESERVED_FDS, 64)


def make_fs(spec: FsSpec, shares: int = 1) -> VirtioFs:
    """Open the shared directory; a missing one, or a file, is a ``ConfigError`` naming it."""
    try:
        fd = os.open(spec.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"--fs {spec.path}: no such directory") from None
    except NotADirectoryError:
        raise ConfigError(f"--fs {spec.path}: not a directory") from None
    except OSError as e:
        raise ConfigError(f"--fs {spec.path}: cannot open: {e.strerror}") from None
    try:
        st = os.stat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"--fs {spec.path}: not a directory")
        if not spec.readonly and not os.access(spec.path, os.W_OK):
            raise ConfigError(f"--fs {spec.path}: not writable; add readonly=on to share it read-only")
        budget = _fd_budget() // max(shares, 1)
        table = InodeTable(
            fd,
            st,
            max_inodes=min(DEFAULT_MAX_INODES, budget * 3 // 4),
            max_handles=min(DEFAULT_MAX_HANDLES, budget // 4),
        )
    except BaseException:
        os.close(fd)
        raise
    return VirtioFs(table, spec.tag, readonly=spec.readonly, cache=spec.cache)


__all__ = ["VirtioFs", "make_fs"]
