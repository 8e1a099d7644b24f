"""Copies of disk images: a snapshot's own copy of each drive (for clones), and each clone's private one.

A clone writes to its own copy, never to a shared image: ``copy_image`` clones the file's extents where the
file system can share them (FICLONE: btrfs, XFS, bcachefs; copy-on-write, instant) and otherwise copies only
its data extents (SEEK_DATA, copy_file_range), keeping holes, so a mostly-empty image copies quickly.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from evmm.confine.ioctls import FICLONE
from evmm.snapshot.format import SnapshotError
from evmm.snapshot.memfile import data_extents


def copy_image(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst`` (replaced); returns how: "reflink" or "copy"."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
                how = "reflink"
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                    raise
                how = "copy"
                size = os.fstat(fin.fileno()).st_size
                os.ftruncate(fout.fileno(), size)
                for a, b in data_extents(fin.fileno(), 0, size):
                    _copy_range(fin.fileno(), fout.fileno(), a, b)
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"copying the disk image {src} to {dst}: {e.strerror or e}") from None
    return how


def _copy_range(fin: int, fout: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = os.copy_file_range(fin, fout, end - pos, pos, pos)
        if n == 0:
            raise OSError(errno.EIO, f"the image ended at {pos}, inside a data extent (it shrank?)")
        pos += n


__all__ = ["copy_image"]
