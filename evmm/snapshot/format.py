"""The snapshot directory and its state file: versioned, checksummed msgpack.

    DIR/state.evmm   header + one msgpack map: evmm's version, the CPU features the guest used, the machine's
                     configuration, the KVM state of the VM and every vCPU, and every device's state
    DIR/memory       guest RAM, regions one after another in guest-physical order, sparse (a hole wherever
                     the guest never wrote); restored with MAP_PRIVATE, so it is read only as pages are touched
    DIR/disk-ID.img  a drive's image at the moment of the snapshot, when the snapshot copied it (clones)

The state file's header (little-endian): the magic ``EVMMSNAP``, the format version (u32), the body's length
(u64) and its SHA-256 (32 bytes).  Reading refuses, in one line each: a file that is not a snapshot, a
different format or evmm version (a state written by another evmm is never reinterpreted), a body shorter
than the header says (truncated) and a body whose checksum differs (corrupted).  The memory file is not
checksummed (reading all of it would cost what MAP_PRIVATE saves); its size is checked.
"""

from __future__ import annotations

import hashlib
import os
import struct
from functools import cache
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]

from evmm.errors import EvmmError

MAGIC = b"EVMMSNAP"
FORMAT = 1
STATE_FILE = "state.evmm"
MEMORY_FILE = "memory"
_HEADER = struct.Struct("<8sIQ32s")


class SnapshotError(EvmmError):
    """A snapshot that cannot be written or loaded; the message is one line naming the snapshot."""


@cache
def evmm_version() -> str:
    """This evmm's version (the package metadata), which a snapshot must match to be loaded."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evmm")
    except PackageNotFoundError:
        return "unknown"


def pack_state(body: dict[str, Any]) -> bytes:
    """Header and body of a state file; ``body`` gets this evmm's version and the format."""
    payload: bytes = msgpack.packb({**body, "evmm": evmm_version(), "format": FORMAT}, use_bin_type=True)
    return _HEADER.pack(MAGIC, FORMAT, len(payload), hashlib.sha256(payload).digest()) + payload


def unpack_state(data: bytes, where: str) -> dict[str, Any]:
    """The body of a state file, or a ``SnapshotError`` saying in one line what is wrong with it."""
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise SnapshotError(f"{where}: not an evmm snapshot state file")
    _, fmt, length, digest = _HEADER.unpack_from(data)
    if fmt != FORMAT:
        raise SnapshotError(
            f"{where}: snapshot format {fmt}, this evmm ({evmm_version()}) reads format {FORMAT} only"
        )
    payload = data[_HEADER.size :]
    if len(payload) < length:
        raise SnapshotError(f"{where}: truncated ({len(payload)} of {length} bytes after the header)")
    if len(payload) > length or hashlib.sha256(payload).digest() != digest:
        raise SnapshotError(f"{where}: corrupted (its SHA-256 does not match the one it was written with)")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as e:  # the checksum matched: written so by a bug
        raise SnapshotError(f"{where}: unreadable state ({e})") from None
    if not isinstance(body, dict):
        raise SnapshotError(f"{where}: unreadable state (not a map)")
    made_by = body.get("evmm")
    if made_by != evmm_version():
        raise SnapshotError(
            f"{where}: made by evmm {made_by}; this is evmm {evmm_version()}, which loads its own snapshots only"
        )
    return body


def write_state(directory: Path, body: dict[str, Any]) -> int:
    """Write ``DIR/state.evmm`` atomically (a new file renamed over any old one); its size in bytes."""
    data = pack_state(body)
    tmp = directory / f".{STATE_FILE}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)
    return len(data)


def read_state(directory: Path) -> dict[str, Any]:
    """The body of ``DIR/state.evmm``, checked; every problem is one ``SnapshotError`` line."""
    path = directory / STATE_FILE
    if not directory.is_dir():
        raise SnapshotError(f"snapshot {directory}: no such directory")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(
            f"snapshot {directory}: no {STATE_FILE} in it (not a snapshot directory)"
        ) from None
    except OSError as e:
        raise SnapshotError(f"snapshot {path}: {e.strerror}") from None
    return unpack_state(data, f"snapshot {path}")


class Fields:
    """Typed access to one map of a state body; a missing or mistyped field is one ``SnapshotError`` line.

    The body's checksum matched, so a bad field means a bug (or a hand-edited file): it must still not
    become a traceback or a half-restored VM.
    """

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise SnapshotError(f"{where}: not a map")
        self.data: dict[str, Any] = data
        self.where = where

    def _get(self, key: str, kind: type | tuple[type, ...], name: str) -> Any:
        if key not in self.data:
            raise SnapshotError(f"{self.where}: no {key!r}")
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SnapshotError(f"{self.where}: {key!r} is not {name}")
        return value

    def integer(self, key: str, most: int | None = None) -> int:
        """The integer at ``key``; with ``most``, one from 0 to ``most`` (a register, a ring index)."""
        value = int(self._get(key, int, "an integer"))
        if most is not None and not 0 <= value <= most:
            raise SnapshotError(f"{self.where}: {key!r} is {value}, out of range (0 to {most:#x})")
        return value

    def boolean(self, key: str) -> bool:
        return bool(self._get(key, bool, "a boolean"))

    def blob(self, key: str) -> bytes:
        return bytes(self._get(key, bytes, "bytes"))

    def text(self, key: str) -> str:
        return str(self._get(key, str, "a string"))

    def opt_text(self, key: str) -> str | None:
        value = self.data.get(key)
        return None if value is None else self.text(key)

    def items(self, key: str) -> list[Any]:
        return list(self._get(key, (list, tuple), "a list"))

    def map(self, key: str) -> Fields:
        return Fields(self._get(key, dict, "a map"), f"{self.where}: {key}")

    def version(self, version: int) -> Fields:
        """Check the map's ``"v"``: each device's state is versioned on its own (as Firecracker's are)."""
        found = self.integer("v")
        if found != version:
            raise SnapshotError(f"{self.where}: state version {found}; this evmm restores version {version}")
        return self


__all__ = [
    "FORMAT",
    "MAGIC",
    "MEMORY_FILE",
    "STATE_FILE",
    "Fields",
    "SnapshotError",
    "evmm_version",
    "pack_state",
    "read_state",
    "unpack_state",
    "write_state",
]
