"""Guest RAM: anonymous mappings or a snapshot's memory file (MAP_PRIVATE), and bounds-checked access.

Nothing here knows KVM.  The machine builder hands each region's buffer to KVM as a memory slot; devices get the
``GuestMemory`` object and every guest-supplied address goes through ``_locate``, so a hostile guest can name any
address it likes and still only ever reach its own RAM.
"""

from __future__ import annotations

import io
import mmap
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from evmm.errors import ConfigError, GuestMemoryError
from evmm.record import record


def _full_barrier() -> None:
    # Compiled with evmm's other C helpers (a C11 seq_cst fence); imported on first use.
    from evmm.kvm._kvm_ffi import lib

    global _full_barrier
    _full_barrier = lib.evmm_full_barrier
    lib.evmm_full_barrier()


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@record(frozen=True)
class MemoryRegion:
    """One contiguous range of guest-physical RAM backed by one host mapping."""

    gpa: int
    size: int
    buffer: mmap.mmap

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM made of non-overlapping regions (below the 32-bit MMIO hole, and above 4 GiB)."""

    def __init__(self, regions: Iterable[MemoryRegion], backing: io.FileIO | None = None) -> None:
        self._regions = tuple(sorted(regions, key=lambda r: r.gpa))
        for a, b in zip(self._regions, self._regions[1:], strict=False):
            if a.end > b.gpa:
                raise ConfigError(f"guest memory regions overlap at {b.gpa:#x}")
        # The file the regions were mapped from (``from_file``), regions one after another; None: anonymous.
        self.backing = backing

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]]) -> GuestMemory:
        """Map each ``(gpa, size)`` as private anonymous memory.

        MAP_NORESERVE: the host commits pages only when the guest touches them, so a 1 GiB guest that uses
        100 MiB costs 100 MiB, as users of microVMs expect.
        """
        regions = []
        for gpa, size in layout:
            if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                raise ConfigError(f"guest memory region {gpa:#x}+{size:#x} is not page-aligned")
            try:
                buf = mmap.mmap(
                    -1,
                    size,
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000),
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                )
            except OSError as e:
                raise ConfigError(f"cannot map {size >> 20} MiB of guest memory: {e.strerror}") from None
            regions.append(MemoryRegion(gpa, size, buf))
        return cls(regions)

    @classmethod
    def from_file(cls, path: Path, layout: Iterable[tuple[int, int]]) -> GuestMemory:
        """Map the regions of ``layout`` from ``path``, one after another, MAP_PRIVATE (a restored snapshot).

        Pages are read from the file only when first touched, and writes go to private copies: the file is
        never written, and any number of VMs may map it at once.  Raises ``OSError``.
        """
        f = io.FileIO(path, "r")
        regions = []
        offset = 0
        try:
            for gpa, size in layout:
                buf = mmap.mmap(
                    f.fileno(),
                    size,
                    flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0x4000),
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=offset,
                )
                regions.append(MemoryRegion(gpa, size, buf))
                offset += size
        except BaseException:
            for r in regions:
                r.buffer.close()
            f.close()
            raise
        return cls(regions, backing=f)

    def file_offset(self, index: int) -> int:
        """Where region ``index`` starts in a memory file that holds the regions one after another."""
        return sum(r.size for r in self._regions[:index])

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return self._regions

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def _locate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest memory access {gpa:#x}+{length:#x}")
        for r in self._regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.buffer, gpa - r.gpa
        raise GuestMemoryError(f"guest address range {gpa:#x}+{length:#x} is not in guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of ``length`` bytes at ``gpa``; the range must lie in one region."""
        buf, off = self._locate(gpa, length)
        return memoryview(buf)[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        buf, off = self._locate(gpa, length)
        return buf[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        buf, off = self._locate(gpa, n)
        buf[off : off + n] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        buf, off = self._locate(gpa, length)
        buf[off : off + length] = bytes([byte]) * length

    def read_u16(self, gpa: int) -> int:
        buf, off = self._locate(gpa, 2)
        return int(_U16.unpack_from(buf, off)[0])

    def read_u32(self, gpa: int) -> int:
        buf, off = self._locate(gpa, 4)
        return int(_U32.unpack_from(buf, off)[0])

    def read_u64(self, gpa: int) -> int:
        buf, off = self._locate(gpa, 8)
        return int(_U64.unpack_from(buf, off)[0])

    def write_u16(self, gpa: int, value: int) -> None:
        self._store(gpa, "H", 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._store(gpa, "I", 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._store(gpa, "Q", 8, value)

    def _store(self, gpa: int, fmt: Literal["H", "I", "Q"], size: int, value: int) -> None:
        """One move of the whole value (little-endian: x86), which a running vCPU sees at once when aligned.

        Not struct.pack_into: it zeroes the destination before writing (CPython's s_pack_internal), and a
        vCPU reading meanwhile sees 0 (see evmm/devices/virtio/queue.py for what that did to a virtqueue).
        """
        with self.view(gpa, size) as v, v.cast(fmt) as item:
            item[0] = value

    @staticmethod
    def fence() -> None:
        """A full memory barrier between our stores and later loads of guest memory.

        x86 may let a load pass an earlier store to another address (Intel SDM vol. 3A §9.2.3.4); the virtio
        notification handshake (virtio 1.2 §2.7.10) must not, or device and driver can both miss a wake-up.
        """
        _full_barrier()

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
        for r in self._regions:
            try:
                r.buffer.close()
            except BufferError:
                # A view is still held somewhere (a request a device abandoned); the mapping goes away with
                # the last reference instead.
                pass
