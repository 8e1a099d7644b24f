"""Whether a range of an image is in the page cache, for file systems where preadv2's RWF_NOWAIT is refused.

RWF_NOWAIT (preadv2(2)) lets the reactor read a cached range in place and get EAGAIN otherwise, but a file
system must opt in (FMODE_NOWAIT): ext4, xfs, btrfs and block devices do; tmpfs, where ``evmm bench`` and
many serverless hosts keep images, answers EOPNOTSUPP even on Linux 6.18.  For those, mincore(2) on a
mapping of the image says whether every page of a range is resident (for tmpfs: in memory, not swapped
out), and a plain preadv of a resident range only copies.  The mapping is read-only in intent and never
touched: mincore reads the page cache, not our page tables.
"""

from __future__ import annotations

import ctypes
import mmap

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_mincore = _libc.mincore
# int mincore(void *addr, size_t length, unsigned char *vec)
_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_mincore.restype = ctypes.c_int
_VEC_PAGES = 32  # 128 KiB: INLINE_READ_MAX in device.py


class Residency:
    """mincore(2) over a private mapping of ``fd``'s first ``size`` bytes."""

    def __init__(self, fd: int, size: int) -> None:
        # MAP_PRIVATE with PROT_WRITE maps a read-only fd too and gives ctypes a writable buffer to take the
        # address of; nothing ever writes through it, so every page stays the page cache's own.
        self._map = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._size = size
        self._vec = ctypes.create_string_buffer(_VEC_PAGES)

    def resident(self, offset: int, length: int) -> bool:
        """Every page of ``offset``..``offset + length`` is in the page cache (False when unsure)."""
        first = offset - offset % _PAGE
        pages = (offset + length - first + _PAGE - 1) // _PAGE
        if length <= 0 or pages > _VEC_PAGES or offset < 0 or offset + length > self._size:
            return False
        if _mincore(self._addr + first, pages * _PAGE, self._vec) != 0:
            return False
        vec = self._vec.raw
        return all(vec[i] & 1 for i in range(pages))

    def close(self) -> None:
        self._map.close()


__all__ = ["Residency"]
