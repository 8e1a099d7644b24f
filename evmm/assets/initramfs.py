"""An initramfs in the cpio "newc" format (Linux Documentation/driver-api/early-userspace/buffer-format.rst).

Written in pure Python rather than with cpio(1): it needs no root for device nodes (``/dev/console`` must
exist before ``/init`` runs), and the same inputs always give the same bytes (mtime 0, inode numbers by order).
"""

from __future__ import annotations

import gzip
import stat
from pathlib import PurePosixPath

from evmm.record import record

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@record(frozen=True)
class Entry:
    path: str  # relative, no leading '/'
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _normalise(path: str) -> str:
    p = PurePosixPath("/", path)
    if ".." in p.parts:
        raise ValueError(f"initramfs path {path!r} contains '..'")
    return str(p).lstrip("/")


class Archive:
    """The files of an initramfs, in the order they were added; parents are created on demand."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _add(self, entry: Entry) -> None:
        parent = str(PurePosixPath(entry.path).parent)
        if parent != "." and parent not in self._entries:
            self.directory(parent)
        existing = self._entries.get(entry.path)
        if existing is not None and not (stat.S_ISDIR(existing.mode) and stat.S_ISDIR(entry.mode)):
            raise ValueError(f"initramfs path /{entry.path} added twice")
        self._entries[entry.path] = entry

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._add(Entry(_normalise(path), stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(Entry(_normalise(path), stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self._add(Entry(_normalise(path), stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(Entry(_normalise(path), stat.S_IFCHR | mode, rdev=(major, minor)))

    def to_cpio(self) -> bytes:
        out = bytearray()
        for ino, entry in enumerate(self._entries.values(), start=1):
            _write_entry(out, ino, entry.path, entry.mode, entry.data, entry.rdev)
        _write_entry(out, 0, _TRAILER, 0, b"", (0, 0))
        return bytes(out)

    def to_gzip(self, level: int = 6) -> bytes:
        return gzip.compress(self.to_cpio(), compresslevel=level, mtime=0)


def _write_entry(out: bytearray, ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    out += header + encoded + _pad4(len(header) + len(encoded))
    out += data + _pad4(len(data))


def read_cpio(blob: bytes) -> list[Entry]:
    """Parse a newc archive back into entries (for tests and for inspecting a built initramfs)."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if blob[pos : pos + 6] != _MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = blob[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == _TRAILER:
            return entries
        entries.append(Entry(name, mode, blob[data_start : data_start + size], (rmaj, rmin)))
        pos = data_start + size + (-size % 4)
