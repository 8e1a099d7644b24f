"""A vhost device fd: the ioctls of <linux/vhost.h> every vhost device shares (drivers/vhost/vhost.c).

The kernel serves virtqueues itself: it reads the rings from guest RAM through the memory table, is kicked by
an eventfd and signals used buffers on another.  ``VhostFd`` sets that up for one device fd; a device's own
ioctls live in a subclass (``evmm.vhost.vsock``).  Plain ints in and out, never cdata; every failure is a
``VhostError`` (an ``OSError``) carrying the errno, so the caller can tell "no such device" from "CID in use"
and say so in its own words.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

from evmm.errors import EvmmError
from evmm.record import record

try:
    from evmm.vhost._vhost_ffi import ffi, lib
except ImportError as e:  # pragma: no cover - only on an install from before the vhost bindings
    raise EvmmError(
        "evmm's vhost bindings are not compiled: reinstall with `pip install -e .` (needs gcc and linux-libc-dev)"
    ) from e

if TYPE_CHECKING:
    from evmm.memory import MemoryRegion


class VhostError(OSError):
    """A vhost ioctl (or opening the device) failed; ``errno`` says why, ``str()`` is one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise VhostError(-ret, f"{what} failed: {os.strerror(-ret)}")
    return ret


@record(frozen=True)
class MemTableEntry:
    gpa: int
    size: int
    user_addr: int  # where this process maps it


class MemTable:
    """Guest-physical ranges and this process's addresses for them: what VHOST_SET_MEM_TABLE tells the kernel.

    Holds a buffer export of each region's mapping while the kernel may use the table, so the mapping cannot
    be unmapped under it (GuestMemory.close then leaves the unmap to the last reference).
    """

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        self._handles: list[Any] = []
        entries = []
        for r in regions:
            handle = ffi.from_buffer(r.buffer)
            self._handles.append(handle)
            entries.append(MemTableEntry(r.gpa, r.size, int(ffi.cast("uintptr_t", handle))))
        self.entries = tuple(entries)

    def user_addr(self, gpa: int, length: int) -> int:
        """This process's address of ``length`` bytes at ``gpa``; they must lie in one region."""
        for e in self.entries:
            if e.gpa <= gpa and gpa + length <= e.gpa + e.size:
                return e.user_addr + (gpa - e.gpa)
        raise VhostError(errno.EINVAL, f"guest range {gpa:#x}+{length:#x} is not in the vhost memory table")

    def release(self) -> None:
        for handle in self._handles:
            ffi.release(handle)
        self._handles.clear()


class VhostFd:
    """An open vhost device owned by this process (VHOST_SET_OWNER: its worker uses our memory)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._table: MemTable | None = None

    @classmethod
    def open(cls, path: str) -> Self:
        """Open ``path`` and make this process its owner, or raise a ``VhostError`` naming the path."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostError(e.errno, f"{path}: {e.strerror}") from None
        try:
            # linux/vhost.h: "This must be called before any other vhost command."
            _check(lib.evmm_vhost_ioctl_val(fd, lib.VHOST_SET_OWNER, 0), "VHOST_SET_OWNER")
        except VhostError:
            os.close(fd)
            raise
        return cls(fd)

    def _ioctl(self, request: int, arg: Any, what: str) -> int:
        return _check(lib.evmm_vhost_ioctl(self.fd, request, arg), what)

    def get_features(self) -> int:
        val = ffi.new("uint64_t *")
        self._ioctl(lib.VHOST_GET_FEATURES, val, "VHOST_GET_FEATURES")
        return int(val[0])

    def set_features(self, features: int) -> None:
        self._ioctl(lib.VHOST_SET_FEATURES, ffi.new("uint64_t *", features), "VHOST_SET_FEATURES")

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        table = MemTable(regions)
        mem = ffi.new(
            "struct vhost_memory *", {"nregions": len(table.entries), "regions": len(table.entries)}
        )
        for i, e in enumerate(table.entries):
            mem.regions[i].guest_phys_addr = e.gpa
            mem.regions[i].memory_size = e.size
            mem.regions[i].userspace_addr = e.user_addr
        try:
            self._ioctl(lib.VHOST_SET_MEM_TABLE, mem, "VHOST_SET_MEM_TABLE")
        except VhostError:
            table.release()
            raise
        if self._table is not None:
            self._table.release()
        self._table = table

    def set_vring_num(self, index: int, num: int) -> None:
        state = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        self._ioctl(lib.VHOST_SET_VRING_NUM, state, f"VHOST_SET_VRING_NUM (queue {index})")

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        """The ring areas by guest-physical address; the kernel gets this process's addresses for them."""
        if self._table is None:
            raise VhostError(errno.EINVAL, "VHOST_SET_VRING_ADDR before VHOST_SET_MEM_TABLE")
        addr = ffi.new(
            "struct vhost_vring_addr *",
            {
                "index": index,
                "flags": 0,  # no VHOST_VRING_F_LOG: evmm does not log dirty pages
                "desc_user_addr": self._table.user_addr(desc, 16),
                "avail_user_addr": self._table.user_addr(avail, 4),
                "used_user_addr": self._table.user_addr(used, 4),
            },
        )
        self._ioctl(lib.VHOST_SET_VRING_ADDR, addr, f"VHOST_SET_VRING_ADDR (queue {index})")

    def set_vring_base(self, index: int, base: int) -> None:
        state = ffi.new("struct vhost_vring_state *", {"index": index, "num": base})
        self._ioctl(lib.VHOST_SET_VRING_BASE, state, f"VHOST_SET_VRING_BASE (queue {index})")

    def get_vring_base(self, index: int) -> int:
        """The next avail index the kernel would have read (a stopped ring resumes from it)."""
        state = ffi.new("struct vhost_vring_state *", {"index": index})
        self._ioctl(lib.VHOST_GET_VRING_BASE, state, f"VHOST_GET_VRING_BASE (queue {index})")
        return int(state.num)

    def _vring_file(self, request: int, index: int, fd: int | None, what: str) -> None:
        f = ffi.new(
            "struct vhost_vring_file *", {"index": index, "fd": lib.VHOST_FILE_UNBIND if fd is None else fd}
        )
        self._ioctl(request, f, f"{what} (queue {index})")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the kernel polls for the driver's notifications; None unbinds it."""
        self._vring_file(lib.VHOST_SET_VRING_KICK, index, fd, "VHOST_SET_VRING_KICK")

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the kernel writes when it used buffers and the driver wants to know; None unbinds."""
        self._vring_file(lib.VHOST_SET_VRING_CALL, index, fd, "VHOST_SET_VRING_CALL")

    def close(self) -> None:
        """Release the device: the kernel stops its rings, frees the CID and resets the guest's connections."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._table is not None:
            self._table.release()
            self._table = None


__all__ = ["MemTable", "VhostError", "VhostFd"]
