"""The guest side of virtio-fs for tests: FUSE requests laid out as Linux's virtio_fs driver lays them out
(fs/fuse/virtio_fs.c: the in header, the arguments, then WRITE's data; the out header, the reply, then READ's
data), on the driver-side virtqueues of tests/fakes/virtio_driver.py.

The structs are packed here from include/uapi/linux/fuse.h on purpose, not with evmm's own encoder, so that
a layout mistake in evmm shows as a failure rather than agreeing with itself.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from dataclasses import dataclass

from evmm.devices.virtio.fs.device import VirtioFs
from tests.fakes.virtio_driver import DriverQueue, MmioDriver

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_HEAD = struct.Struct("<QQQQII")
ENTRY_SIZE = ENTRY_HEAD.size + ATTR.size  # 128
ATTR_OUT_SIZE = 16 + ATTR.size  # 104
OPEN_OUT = struct.Struct("<QII")
DIRENT = struct.Struct("<QQII")

LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = range(8, 19)
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = range(20, 27)
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = range(27, 36)
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET = range(36, 43)
FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = range(43, 48)
ROOT = 1


@dataclass
class Attr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


@dataclass
class Entry:
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    attr: Attr


def parse_entry(data: bytes) -> Entry:
    nodeid, gen, ev, av, _evn, _avn = ENTRY_HEAD.unpack_from(data)
    return Entry(nodeid, gen, ev, av, Attr(*ATTR.unpack_from(data, ENTRY_HEAD.size)))


def parse_attr_out(data: bytes) -> Attr:
    return Attr(*ATTR.unpack_from(data, 16))


def cstr(name: bytes | str) -> bytes:
    return (name.encode() if isinstance(name, str) else name) + b"\0"


@dataclass
class Answer:
    error: int  # negative errno as on the wire, 0 for success
    payload: bytes
    used_len: int
    out_len: int  # what the out header's len field said


class FuseError(AssertionError):
    pass


class FuseClient:
    """A VirtioFs brought up by the fake driver, with FUSE requests as methods."""

    def __init__(self, dev: VirtioFs, loop: asyncio.AbstractEventLoop) -> None:
        self.dev = dev
        self.loop = loop
        self.drv = MmioDriver(dev, loop=loop)
        self.drv.bring_up(queue_size=1024)
        self.hiprio: DriverQueue = self.drv.queues[0]
        self.q: DriverQueue = self.drv.queues[1]
        self._unique = itertools.count(2, 2)

    # ---- raw -------------------------------------------------------------------------------------------

    def header(self, opcode: int, nodeid: int, args_len: int, *, uid: int = 0, gid: int = 0) -> bytes:
        unique = next(self._unique)
        return IN_HEADER.pack(IN_HEADER.size + args_len, opcode, unique, nodeid, uid, gid, 1, 0, 0)

    def post(self, opcode: int, nodeid: int, args: bytes, out_size: int, *, data: bytes = b"",
             uid: int = 0, gid: int = 0, split: bool = False) -> int:  # fmt: skip
        hdr = self.header(opcode, nodeid, len(args) + len(data), uid=uid, gid=gid)
        readable = [hdr, args] if not split else [hdr[:7], hdr[7:] + args[:3], args[3:]]
        readable = [b for b in readable if b] + ([data] if data else [])
        writable = [OUT_HEADER.size] + ([out_size] if out_size else [])
        return self.q.add(readable, writable, indirect=len(readable) + len(writable) > 8)

    def wait(self, queue: DriverQueue, n: int, timeout: float = 10.0) -> list[tuple[int, int, bytes]]:
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            got += [(u.head, u.length, u.data) for u in queue.get_used()]
            if len(got) >= n:
                return got
            assert time.monotonic() < deadline, f"{len(got)} of {n} requests completed"
            self.loop.run_until_complete(asyncio.sleep(0.002))

    def call(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 0, **kw: object) -> Answer:
        head = self.post(opcode, nodeid, args, out_size, **kw)  # type: ignore[arg-type]
        self.drv.kick(1)
        ((used_head, length, data),) = self.wait(self.q, 1)
        assert used_head == head
        assert length >= OUT_HEADER.size, f"used length {length}: no reply header"
        out_len, error, _unique = OUT_HEADER.unpack_from(data)
        assert out_len == length, f"out header says {out_len}, used length {length}"
        return Answer(error, data[OUT_HEADER.size : length], length, out_len)

    def ok(self, opcode: int, nodeid: int, args: bytes = b"", out_size: int = 0, **kw: object) -> bytes:
        a = self.call(opcode, nodeid, args, out_size, **kw)
        if a.error:
            raise FuseError(f"opcode {opcode} on node {nodeid}: errno {-a.error}")
        return a.payload

    def forget(self, items: list[tuple[int, int]]) -> None:
        if len(items) == 1:
            nodeid, n = items[0]
            readable = [self.header(FORGET, nodeid, 8), struct.pack("<Q", n)]
        else:
            body = struct.pack("<II", len(items), 0) + b"".join(struct.pack("<QQ", *i) for i in items)
            readable = [self.header(BATCH_FORGET, 0, len(body)), body]
        self.hiprio.add(readable, [])
        self.drv.kick(0)
        ((_, length, _),) = self.wait(self.hiprio, 1)
        assert length == 0

    # ---- operations ------------------------------------------------------------------------------------

    def init(self, minor: int = 37, flags: int = 0xFFFFFFFF) -> bytes:
        args = struct.pack("<IIII", 7, minor, 128 << 10, flags) + bytes(48)
        return self.ok(INIT, 0, args, 64)

    def lookup(self, parent: int, name: bytes | str) -> Entry:
        return parse_entry(self.ok(LOOKUP, parent, cstr(name), ENTRY_SIZE))

    def getattr(self, nodeid: int) -> Attr:
        return parse_attr_out(self.ok(GETATTR, nodeid, struct.pack("<IIQ", 0, 0, 0), ATTR_OUT_SIZE))

    def mkdir(self, parent: int, name: str, mode: int = 0o755, **kw: object) -> Entry:
        args = struct.pack("<II", mode, 0o022) + cstr(name)
        return parse_entry(self.ok(MKDIR, parent, args, ENTRY_SIZE, **kw))

    def mknod(self, parent: int, name: str, mode: int, rdev: int = 0) -> Answer:
        return self.call(MKNOD, parent, struct.pack("<IIII", mode, rdev, 0o022, 0) + cstr(name), ENTRY_SIZE)

    def create(
        self, parent: int, name: str, mode: int = 0o644, flags: int = 0o102, **kw: object
    ) -> tuple[Entry, int]:
        """O_CREAT|O_RDWR by default; returns the entry and the file handle."""
        payload = self.ok(CREATE, parent, struct.pack("<IIII", flags, mode, 0o022, 0) + cstr(name),
                          ENTRY_SIZE + OPEN_OUT.size, **kw)  # fmt: skip
        return parse_entry(payload), OPEN_OUT.unpack_from(payload, ENTRY_SIZE)[0]

    def open(self, nodeid: int, flags: int = 2, opcode: int = OPEN) -> int:
        return int(
            OPEN_OUT.unpack_from(self.ok(opcode, nodeid, struct.pack("<II", flags, 0), OPEN_OUT.size))[0]
        )

    def release(self, nodeid: int, fh: int, opcode: int = RELEASE) -> None:
        self.ok(opcode, nodeid, struct.pack("<QIIQ", fh, 0, 0, 0))

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        args = struct.pack("<QQIIQII", fh, offset, len(data), 0, 0, 0, 0)
        return int(struct.unpack_from("<I", self.ok(WRITE, nodeid, args, 8, data=data))[0])

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.ok(READ, nodeid, struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0), size)

    def readdir(
        self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, plus: bool = False
    ) -> list[tuple[bytes, int, Entry | None]]:
        """(name, next offset, entry for READDIRPLUS) of each record."""
        op = READDIRPLUS if plus else READDIR
        buf = self.ok(op, nodeid, struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0), size)
        out: list[tuple[bytes, int, Entry | None]] = []
        pos = 0
        while pos < len(buf):
            entry = parse_entry(buf[pos:]) if plus else None
            pos += ENTRY_SIZE if plus else 0
            _ino, off, namelen, _type = DIRENT.unpack_from(buf, pos)
            name = buf[pos + DIRENT.size : pos + DIRENT.size + namelen]
            pos += (DIRENT.size + namelen + 7) & ~7
            out.append((name, off, entry))
        return out

    def setattr(self, nodeid: int, valid: int, *, size: int = 0, mode: int = 0, uid: int = 0, gid: int = 0,
                atime: int = 0, mtime: int = 0, fh: int = 0) -> Attr:  # fmt: skip
        args = struct.pack(
            "<IIQQQQQQIIIIIIII", valid, 0, fh, size, 0, atime, mtime, 0, 0, 0, 0, mode, 0, uid, gid, 0
        )
        return parse_attr_out(self.ok(SETATTR, nodeid, args, ATTR_OUT_SIZE))

    def rename(self, olddir: int, old: str, newdir: int, new: str, flags: int = 0) -> Answer:
        if flags:
            return self.call(RENAME2, olddir, struct.pack("<QII", newdir, flags, 0) + cstr(old) + cstr(new))
        return self.call(RENAME, olddir, struct.pack("<Q", newdir) + cstr(old) + cstr(new))
