"""virtio-fs through the virtio-mmio transport and a FUSE client fake, against a temporary directory:
every operation a Linux guest uses, the answers to hostile requests, escapes that must fail, the fd caps."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.devices.virtio.fs import make_fs
from evmm.devices.virtio.fs.device import VirtioFs
from evmm.devices.virtio.fs.inodes import InodeTable
from evmm.errors import ConfigError
from evmm.machine.devspec import FsSpec, parse_fs
from tests.fakes import fuse_client as fc
from tests.fakes.fuse_client import ROOT, Answer, FuseClient, cstr

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1, 2, 4, 8, 16, 32, 64


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


def bring_up(dev: VirtioFs, loop: asyncio.AbstractEventLoop) -> FuseClient:
    c = FuseClient(dev, loop)
    c.init()
    return c


@pytest.fixture
def client(share: Path, loop: asyncio.AbstractEventLoop) -> Iterator[FuseClient]:
    c = bring_up(make_fs(FsSpec(share, "share")), loop)
    yield c
    c.dev.close()


def test_config_space_and_init(client: FuseClient) -> None:
    assert client.dev.device_id == 26
    cfg = client.dev.config()
    assert len(cfg) == 40 and cfg[:36] == b"share".ljust(36, b"\0")
    assert struct.unpack_from("<I", cfg, 36)[0] == 1  # num_request_queues
    out = client.init()
    major, minor, _ra, flags, _bg, _ct, max_write, _tg, max_pages = struct.unpack_from("<IIIIHHIIH", out)
    assert (major, minor) == (7, 31) and max_write == 1 << 20 and max_pages == 256
    assert flags & (1 << 13)  # DO_READDIRPLUS


def test_requests_before_init_and_unknown_opcodes(share: Path, loop: asyncio.AbstractEventLoop) -> None:
    c = FuseClient(make_fs(FsSpec(share, "t")), loop)
    try:
        assert c.call(fc.GETATTR, ROOT, bytes(16), 104).error == -errno.EIO
        c.init()
        for op in (fc.GETLK, fc.IOCTL, fc.BMAP, fc.COPY_FILE_RANGE, 50, 4096, 0xFFFFFFFF):
            a = c.call(op, ROOT, bytes(64), 64)
            assert a.error == -errno.ENOSYS and a.payload == b""
        assert c.getattr(ROOT).mode & stat.S_IFDIR
    finally:
        c.dev.close()


def test_create_write_read_back(client: FuseClient, share: Path) -> None:
    entry, fh = client.create(ROOT, "f.txt", 0o640)
    data = os.urandom(300_000)
    assert client.write(entry.nodeid, fh, 0, data) == len(data)
    assert (share / "f.txt").read_bytes() == data  # on the host at once
    assert client.read(entry.nodeid, fh, 1000, 5000) == data[1000:6000]
    assert client.read(entry.nodeid, fh, len(data) - 10, 4096) == data[-10:]  # short at the end
    assert client.read(entry.nodeid, fh, len(data) + 10, 4096) == b""
    client.release(entry.nodeid, fh)
    st = (share / "f.txt").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and entry.attr.mode == stat.S_IFREG | 0o640
    assert client.lookup(ROOT, "f.txt").nodeid == entry.nodeid  # one node id per inode
    fh2 = client.open(entry.nodeid, os.O_RDONLY)
    assert client.read(entry.nodeid, fh2, 0, 16) == data[:16]
    client.release(entry.nodeid, fh2)


def test_write_data_split_across_buffers(client: FuseClient, share: Path) -> None:
    entry, fh = client.create(ROOT, "split")
    data = os.urandom(10_000)
    args = struct.pack("<QQIIQII", fh, 0, len(data), 0, 0, 0, 0)
    hdr = client.header(fc.WRITE, entry.nodeid, len(args) + len(data))
    # Header and args in odd pieces, the data in three more.
    client.q.add([hdr[:5], hdr[5:] + args[:9], args[9:] + data[:100], data[100:4000], data[4000:]], [16, 8])
    client.drv.kick(1)
    ((_, length, out),) = client.wait(client.q, 1)
    assert length == 24 and struct.unpack_from("<IiQI", out)[:2] == (24, 0)
    assert (share / "split").read_bytes() == data


def test_mkdir_symlink_link_readlink_rename_unlink_rmdir(client: FuseClient, share: Path) -> None:
    d = client.mkdir(ROOT, "dir", 0o750)
    assert (share / "dir").is_dir() and stat.S_IMODE((share / "dir").stat().st_mode) == 0o750
    f, fh = client.create(d.nodeid, "a")
    client.release(f.nodeid, fh)
    link = fc.parse_entry(client.ok(fc.LINK, ROOT, struct.pack("<Q", f.nodeid) + cstr("hard"), fc.ENTRY_SIZE))
    assert link.nodeid == f.nodeid and link.attr.nlink == 2
    assert (share / "hard").stat().st_ino == (share / "dir" / "a").stat().st_ino
    sym = fc.parse_entry(client.ok(fc.SYMLINK, ROOT, cstr("sym") + cstr("dir/a"), fc.ENTRY_SIZE))
    assert stat.S_ISLNK(sym.attr.mode) and os.readlink(share / "sym") == "dir/a"
    assert client.ok(fc.READLINK, sym.nodeid, b"", 4096) == b"dir/a"
    assert client.rename(d.nodeid, "a", ROOT, "moved").error == 0
    assert (share / "moved").exists() and not (share / "dir" / "a").exists()
    assert client.rename(ROOT, "moved", ROOT, "hard", flags=1).error == -errno.EEXIST  # RENAME_NOREPLACE
    assert client.rename(ROOT, "moved", ROOT, "sym", flags=2).error == 0  # RENAME_EXCHANGE
    assert (share / "moved").is_symlink() and (share / "sym").is_file()
    assert client.call(fc.RMDIR, ROOT, cstr("dir")).error == 0
    assert client.call(fc.UNLINK, ROOT, cstr("hard")).error == 0
    assert client.call(fc.UNLINK, ROOT, cstr("nope")).error == -errno.ENOENT
    assert sorted(p.name for p in share.iterdir()) == ["moved", "sym"]
    assert client.call(fc.LOOKUP, ROOT, cstr("dir"), fc.ENTRY_SIZE).error == -errno.ENOENT


def test_setattr_chmod_chown_truncate_utimes(client: FuseClient, share: Path) -> None:
    f, fh = client.create(ROOT, "f")
    client.write(f.nodeid, fh, 0, b"x" * 5000)
    a = client.setattr(f.nodeid, FATTR_MODE, mode=0o4711)
    assert stat.S_IMODE(a.mode) == 0o4711 and stat.S_IMODE((share / "f").stat().st_mode) == 0o4711
    a = client.setattr(f.nodeid, FATTR_SIZE, size=100)
    assert a.size == 100 and (share / "f").stat().st_size == 100
    a = client.setattr(f.nodeid, FATTR_SIZE | FATTR_FH, size=1 << 30, fh=fh)  # sparse, through the handle
    assert a.size == 1 << 30 and a.blocks * 512 < 1 << 20
    a = client.setattr(f.nodeid, FATTR_ATIME | FATTR_MTIME, atime=1_000_000, mtime=2_000_000)
    assert (a.atime, a.mtime) == (1_000_000, 2_000_000) and (share / "f").stat().st_mtime == 2_000_000
    if os.geteuid() == 0:
        a = client.setattr(f.nodeid, FATTR_UID | FATTR_GID, uid=1234, gid=4321)
        assert (a.uid, a.gid) == (1234, 4321)
        st = (share / "f").stat()
        assert (st.st_uid, st.st_gid) == (1234, 4321)
    client.release(f.nodeid, fh)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners follow the guest's ids only when evmm runs as root")
def test_new_files_belong_to_the_guest_user_with_exact_mode(client: FuseClient, share: Path) -> None:
    old = os.umask(0o077)  # evmm's own umask must not change the guest's modes
    try:
        d = client.mkdir(ROOT, "home", 0o775, uid=1000, gid=100)
        f, fh = client.create(d.nodeid, "file", 0o664, uid=1000, gid=100)
    finally:
        os.umask(old)
    for p, mode in ((share / "home", 0o775), (share / "home" / "file", 0o664)):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 100, mode)
    client.release(f.nodeid, fh)


def test_mknod_fifo_yes_device_no(client: FuseClient, share: Path) -> None:
    assert client.mknod(ROOT, "fifo", stat.S_IFIFO | 0o600).error == 0
    assert stat.S_ISFIFO((share / "fifo").lstat().st_mode)
    assert client.mknod(ROOT, "null", stat.S_IFCHR | 0o666, (1 << 8) | 3).error == -errno.EPERM
    assert not (share / "null").exists()
    fifo = client.lookup(ROOT, "fifo")
    # Opening a FIFO through FUSE would block a worker for good; the guest's kernel opens FIFOs itself.
    assert client.call(fc.OPEN, fifo.nodeid, struct.pack("<II", os.O_RDONLY, 0), 16).error == -errno.EACCES


def test_readdir_and_readdirplus_page_through_a_large_directory(client: FuseClient, share: Path) -> None:
    names = {f"file-{i:04d}-{'x' * (i % 40)}" for i in range(600)}
    for n in names:
        (share / n).write_bytes(b"")
    (share / "sub").mkdir()
    for plus in (False, True):
        fh = client.open(ROOT, os.O_RDONLY, fc.OPENDIR)
        seen: list[bytes] = []
        offset, pages = 0, 0
        while True:
            page = client.readdir(ROOT, fh, offset, 4096, plus=plus)
            if not page:
                break
            pages += 1
            for name, _off, entry in page:
                seen.append(name)
                if plus and name not in (b".", b".."):
                    assert entry is not None and entry.nodeid > ROOT
                    assert entry.attr.ino == os.lstat(share / os.fsdecode(name)).st_ino
            offset = page[-1][1]
        client.release(ROOT, fh, fc.RELEASEDIR)
        assert pages > 5
        assert sorted(seen) == sorted([b".", b"..", b"sub", *(n.encode() for n in names)])
    assert client.dev.table.inodes == len(names) + 2  # root, sub and the files: READDIRPLUS looked them up


def test_statfs_fsync_flush_fallocate_lseek_access(client: FuseClient, share: Path) -> None:
    blocks, _bfree, _bavail, _files, _ffree, bsize, namelen = struct.unpack_from(
        "<QQQQQII", client.ok(fc.STATFS, ROOT, b"", 80)
    )
    sv = os.statvfs(share)
    assert (blocks, bsize, namelen) == (sv.f_blocks, sv.f_bsize, sv.f_namemax)
    f, fh = client.create(ROOT, "f")
    client.write(f.nodeid, fh, 1 << 20, b"data")
    assert client.call(fc.FSYNC, f.nodeid, struct.pack("<QII", fh, 1, 0)).error == 0
    assert client.call(fc.FLUSH, f.nodeid, struct.pack("<QIIQ", fh, 0, 0, 0)).error == 0
    assert client.call(fc.FALLOCATE, f.nodeid, struct.pack("<QQQII", fh, 0, 65536, 0, 0)).error == 0
    assert (share / "f").stat().st_blocks * 512 >= 65536
    seek = client.ok(fc.LSEEK, f.nodeid, struct.pack("<QQII", fh, 70000, 3, 0), 8)  # SEEK_DATA
    assert struct.unpack("<Q", seek)[0] == 1 << 20
    assert client.call(fc.ACCESS, f.nodeid, struct.pack("<II", 4, 0)).error == 0
    client.release(f.nodeid, fh)


def test_xattrs(client: FuseClient, share: Path) -> None:
    f, fh = client.create(ROOT, "f")
    client.release(f.nodeid, fh)
    body = struct.pack("<II", 3, 0) + cstr("user.k") + b"val"
    a = client.call(fc.SETXATTR, f.nodeid, body)
    if a.error == -errno.EOPNOTSUPP:
        pytest.skip("the temporary directory's file system has no user xattrs")
    assert a.error == 0 and os.getxattr(share / "f", "user.k") == b"val"
    size = client.ok(fc.GETXATTR, f.nodeid, struct.pack("<II", 0, 0) + cstr("user.k"), 8)
    assert struct.unpack_from("<I", size)[0] == 3
    assert client.ok(fc.GETXATTR, f.nodeid, struct.pack("<II", 64, 0) + cstr("user.k"), 64) == b"val"
    assert (
        client.call(fc.GETXATTR, f.nodeid, struct.pack("<II", 2, 0) + cstr("user.k"), 2).error
        == -errno.ERANGE
    )
    assert b"user.k\0" in client.ok(fc.LISTXATTR, f.nodeid, struct.pack("<II", 256, 0), 256)
    trusted = struct.pack("<II", 1, 0) + cstr("security.capability") + b"x"
    assert client.call(fc.SETXATTR, f.nodeid, trusted).error == -errno.EPERM
    assert client.call(fc.REMOVEXATTR, f.nodeid, cstr("user.k")).error == 0


def test_unlinked_file_stays_usable_while_open(client: FuseClient, share: Path) -> None:
    f, fh = client.create(ROOT, "tmp")
    assert client.call(fc.UNLINK, ROOT, cstr("tmp")).error == 0
    client.forget([(f.nodeid, 1)])  # the guest dropped the dentry; its open file keeps the inode
    assert client.write(f.nodeid, fh, 0, b"still here") == 10
    assert client.read(f.nodeid, fh, 0, 64) == b"still here"
    assert client.getattr(f.nodeid).nlink == 0
    client.release(f.nodeid, fh)
    assert client.call(fc.GETATTR, f.nodeid, bytes(16), 104).error == -errno.EBADF  # gone now


def test_forget_and_batch_forget_drop_inodes(client: FuseClient, share: Path) -> None:
    for i in range(5):
        (share / f"f{i}").write_bytes(b"")
    ids = [client.lookup(ROOT, f"f{i}").nodeid for i in range(5)]
    client.lookup(ROOT, "f0")  # a second lookup of the same inode
    assert client.dev.table.inodes == 6
    client.forget([(ids[0], 1)])
    assert client.getattr(ids[0]).size == 0  # one lookup left
    client.forget([(ids[0], 1), *((i, 1) for i in ids[1:])])
    assert client.dev.table.inodes == 1
    for i in ids:
        assert client.call(fc.GETATTR, i, bytes(16), 104).error == -errno.EBADF


def test_readonly_share_refuses_writes(share: Path, loop: asyncio.AbstractEventLoop) -> None:
    (share / "f").write_bytes(b"keep")
    c = bring_up(make_fs(FsSpec(share, "ro", readonly=True)), loop)
    try:
        f = c.lookup(ROOT, "f")
        assert (
            c.call(fc.CREATE, ROOT, struct.pack("<IIII", 0o102, 0o644, 0, 0) + cstr("n"), 144).error
            == -errno.EROFS
        )
        assert c.call(fc.OPEN, f.nodeid, struct.pack("<II", os.O_WRONLY, 0), 16).error == -errno.EROFS
        assert c.call(fc.UNLINK, ROOT, cstr("f")).error == -errno.EROFS
        assert c.call(fc.MKDIR, ROOT, struct.pack("<II", 0o755, 0) + cstr("d"), 128).error == -errno.EROFS
        fh = c.open(f.nodeid, os.O_RDONLY)
        assert c.read(f.nodeid, fh, 0, 16) == b"keep"
        args = struct.pack("<QQIIQII", fh, 0, 1, 0, 0, 0, 0)
        assert c.call(fc.WRITE, f.nodeid, args, 8, data=b"x").error == -errno.EROFS
        assert (share / "f").read_bytes() == b"keep" and sorted(os.listdir(share)) == ["f"]
    finally:
        c.dev.close()


# ---- hostile requests and escapes ---------------------------------------------------------------------------


def test_names_that_could_leave_the_directory_are_refused(client: FuseClient, share: Path) -> None:
    for name in (b"..", b".", b"../..", b"a/../../etc", b"/etc", b"", b"x" * 256):
        a = client.call(fc.LOOKUP, ROOT, name + b"\0", fc.ENTRY_SIZE)
        assert a.error in (-errno.EINVAL, -errno.ENAMETOOLONG), name
    assert client.call(fc.LOOKUP, ROOT, b"passwd", fc.ENTRY_SIZE).error == -errno.EINVAL  # no NUL
    assert client.call(fc.MKDIR, ROOT, struct.pack("<II", 0o755, 0) + b"../up\0", 128).error == -errno.EINVAL
    assert not (share.parent / "up").exists()


def test_symlinks_are_never_followed_on_the_host(client: FuseClient, share: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    (share / "to-outside").symlink_to(outside)
    (share / "abs").symlink_to("/etc")
    link = client.lookup(ROOT, "to-outside")
    assert stat.S_ISLNK(link.attr.mode)  # the link itself, for the guest to resolve in its own namespace
    for node in (link.nodeid, client.lookup(ROOT, "abs").nodeid):
        assert client.call(fc.LOOKUP, node, cstr("secret"), fc.ENTRY_SIZE).error == -errno.ENOTDIR
        assert client.call(fc.OPENDIR, node, struct.pack("<II", 0, 0), 16).error == -errno.ENOTDIR
        assert client.call(fc.OPEN, node, struct.pack("<II", 0, 0), 16).error == -errno.EACCES
    # CREATE through a symlink's name must not write where it points.
    (share / "trap").symlink_to(outside / "created")
    assert (
        client.call(fc.CREATE, ROOT, struct.pack("<IIII", 0o101, 0o644, 0, 0) + cstr("trap"), 144).error != 0
    )
    assert not (outside / "created").exists()


def test_a_rename_race_cannot_reach_outside(client: FuseClient, share: Path, tmp_path: Path) -> None:
    """The host swaps a directory for a symlink to outside while the guest looks names up in it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host secret")
    (share / "d").mkdir()
    (share / "d" / "secret").write_bytes(b"inside")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(share / "d", share / "d.real")
            os.symlink(outside, share / "d")
            os.unlink(share / "d")
            os.rename(share / "d.real", share / "d")

    t = threading.Thread(target=swap)
    t.start()
    seen: set[int] = set()
    try:
        for _ in range(300):
            a = client.call(fc.LOOKUP, ROOT, cstr("d"), fc.ENTRY_SIZE)
            if a.error:
                continue
            d = fc.parse_entry(a.payload)
            b = client.call(fc.LOOKUP, d.nodeid, cstr("secret"), fc.ENTRY_SIZE)
            if b.error == 0:
                seen.add(fc.parse_entry(b.payload).attr.ino)
            client.forget([(d.nodeid, 1)])
    finally:
        stop.set()
        t.join()
    assert (outside / "secret").stat().st_ino not in seen
    assert seen <= {(share / "d" / "secret").stat().st_ino}


def test_node_ids_and_handles_are_checked(client: FuseClient) -> None:
    for nodeid in (0, 2, 999, 1 << 63):
        assert client.call(fc.GETATTR, nodeid, bytes(16), 104).error == -errno.EBADF
    f, fh = client.create(ROOT, "f")
    read = struct.pack("<QQIIQII", fh + 1, 0, 16, 0, 0, 0, 0)
    assert client.call(fc.READ, f.nodeid, read, 16).error == -errno.EBADF
    dfh = client.open(ROOT, 0, fc.OPENDIR)
    bad = struct.pack("<QQIIQII", dfh, 0, 16, 0, 0, 0, 0)  # a directory handle is not a file handle
    assert client.call(fc.READ, f.nodeid, bad, 16).error == -errno.EBADF
    assert client.call(fc.LOOKUP, f.nodeid, cstr("x"), fc.ENTRY_SIZE).error == -errno.ENOTDIR
    client.release(f.nodeid, fh)
    assert client.call(fc.RELEASE, f.nodeid, struct.pack("<QIIQ", fh, 0, 0, 0)).error == -errno.EBADF


def test_malformed_requests_fail_alone(client: FuseClient, share: Path) -> None:
    # Too short for its arguments, a header length beyond the buffer, a WRITE whose size lies, no reply room.
    assert client.call(fc.GETATTR, ROOT, b"\0" * 3, 104).error == -errno.EINVAL
    hdr = fc.IN_HEADER.pack(4096, fc.GETATTR, 77, ROOT, 0, 0, 0, 0, 0)
    client.q.add([hdr, bytes(16)], [16, 104])
    args = struct.pack("<QQIIQII", 1, 0, 1 << 20, 0, 0, 0, 0)
    client.q.add([client.header(fc.WRITE, ROOT, len(args) + 4), args, b"abcd"], [16, 8])
    client.q.add([client.header(fc.GETATTR, ROOT, 16), bytes(16)], [8])  # no room for an out header
    client.q.add([b"\1\2\3"], [16])  # not even an in header
    client.drv.kick(1)
    used = client.wait(client.q, 4)
    lengths = sorted(u[1] for u in used)
    assert lengths == [0, 0, 16, 16]
    for _head, length, data in used:
        if length:
            assert struct.unpack_from("<Ii", data) == (16, -errno.EINVAL)
    assert client.getattr(ROOT).mode & stat.S_IFDIR  # and the device goes on


def test_inode_cap_then_enfile(share: Path, loop: asyncio.AbstractEventLoop) -> None:
    for i in range(20):
        (share / f"f{i}").write_bytes(b"")
    fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
    table = InodeTable(fd, os.stat(fd), max_inodes=8, max_handles=2)
    c = bring_up(VirtioFs(table, "cap"), loop)
    try:
        before = len(os.listdir("/proc/self/fd"))
        errors = [c.call(fc.LOOKUP, ROOT, cstr(f"f{i}"), fc.ENTRY_SIZE).error for i in range(20)]
        assert errors[:7] == [0] * 7 and set(errors[7:]) == {-errno.ENFILE}
        assert len(os.listdir("/proc/self/fd")) - before == 7  # no fd kept for the refused lookups
        f0 = c.lookup(ROOT, "f0")  # an inode already held still resolves
        h1, h2 = c.open(f0.nodeid), c.open(f0.nodeid)
        assert c.call(fc.OPEN, f0.nodeid, struct.pack("<II", 2, 0), 16).error == -errno.ENFILE
        c.release(f0.nodeid, h1)
        c.release(f0.nodeid, h2)
        c.forget([(f0.nodeid, 2)])
        assert c.call(fc.LOOKUP, ROOT, cstr("f10"), fc.ENTRY_SIZE).error == 0  # room again
        assert c.dev.table.refused >= 14
    finally:
        c.dev.close()


def test_requests_run_in_parallel_and_the_reset_drains(client: FuseClient, share: Path) -> None:
    f, fh = client.create(ROOT, "big")
    client.write(f.nodeid, fh, 0, os.urandom(1 << 20))
    heads = [
        client.post(fc.READ, f.nodeid, struct.pack("<QQIIQII", fh, i * 65536, 65536, 0, 0, 0, 0), 65536)
        for i in range(16)
    ]
    client.drv.kick(1)
    done = client.wait(client.q, 16)
    assert sorted(h for h, _, _ in done) == sorted(heads)
    assert all(length == 16 + 65536 for _, length, _ in done)
    client.post(fc.READ, f.nodeid, struct.pack("<QQIIQII", fh, 0, 65536, 0, 0, 0, 0), 65536)
    client.drv.kick(1)
    client.dev.reset()  # waits for the read in flight, closes every fd but the root's
    assert client.dev.in_flight == 0 and client.dev.table.inodes == 1 and client.dev.table.handles == 0


def test_fs_spec_parsing_and_bad_directories(tmp_path: Path) -> None:
    spec = parse_fs(f"path={tmp_path},tag=data,readonly=on,cache=none")
    assert spec == FsSpec(tmp_path, "data", readonly=True, cache="none")
    for text, why in (
        ("tag=x", "path= is required"),
        (f"path={tmp_path}", "tag= is required"),
        (f"path={tmp_path},tag={'t' * 37}", "1 to 36"),
        (f"path={tmp_path},tag=a b", "1 to 36"),
        (f"path={tmp_path},tag=t,cache=sometimes", "cache='sometimes'"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_fs(text)
    (tmp_path / "file").write_bytes(b"")
    for path, why in ((tmp_path / "missing", "no such directory"), (tmp_path / "file", "not a directory")):
        with pytest.raises(ConfigError, match=why):
            make_fs(FsSpec(path, "t"))


def test_a_reply_that_does_not_fit_is_an_error(client: FuseClient) -> None:
    a: Answer = client.call(fc.LOOKUP, ROOT, cstr("."), 0)  # EINVAL needs no room beyond the header
    assert a.error == -errno.EINVAL and a.used_len == 16
    a = client.call(fc.GETATTR, ROOT, bytes(16), 40)  # fuse_attr_out is 104 bytes
    assert a.error == -errno.EOVERFLOW and a.used_len == 16


def test_destroy_never_closes_an_fd_a_request_in_flight_uses(
    client: FuseClient, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile DESTROY (or FORGET, RELEASE) while a READ runs: the fd is closed after the read, not under
    it (a closed number could be reused by evmm for another file, and the read would reach that one)."""
    from evmm.devices.virtio.fs import ops

    f, fh = client.create(ROOT, "f")
    client.write(f.nodeid, fh, 0, b"0123456789")
    handle = client.dev.table.handle(fh, False)
    assert handle is not None
    io_fd, path_fd = handle.fd, handle.inode.fd
    started, go = threading.Event(), threading.Event()
    real = ops.read_into

    def slow_read(fd: int, views: list[memoryview], offset: int) -> int:
        started.set()
        assert go.wait(10)
        return real(fd, views, offset)

    monkeypatch.setattr(ops, "read_into", slow_read)
    read = client.post(fc.READ, f.nodeid, struct.pack("<QQIIQII", fh, 0, 10, 0, 0, 0, 0), 10)
    client.drv.kick(1)
    assert started.wait(10)
    assert client.call(fc.DESTROY, 0).error == 0  # answered at once, while the read waits
    os.fstat(io_fd)  # both fds still open
    os.fstat(path_fd)
    go.set()
    ((head, length, data),) = client.wait(client.q, 1)
    assert head == read and data[16:length] == b"0123456789"
    for fd in (io_fd, path_fd):
        with pytest.raises(OSError):
            os.fstat(fd)
    assert client.dev.table.inodes == 1 and client.dev.table.handles == 0


def test_a_flood_of_blocked_requests_leaves_the_reactor_free(
    client: FuseClient, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 LOOKUPs whose host calls cannot finish (a hung disk, say) are all in flight, and the reactor still
    answers what needs no host call; when the host calls return, every LOOKUP is answered."""
    from evmm.devices.virtio.fs import ops

    (share / "f").write_bytes(b"")
    go = threading.Event()
    real = ops.lookup

    def hung_lookup(dirfd: int, name: bytes) -> tuple[int, os.stat_result]:
        assert go.wait(20)
        return real(dirfd, name)

    monkeypatch.setattr(ops, "lookup", hung_lookup)
    heads = {client.post(fc.LOOKUP, ROOT, cstr("f"), fc.ENTRY_SIZE) for _ in range(200)}
    client.drv.kick(1)  # returns: the lookups wait on worker threads, not here
    assert client.dev.in_flight == 200
    a = client.call(fc.GETATTR, 12345, bytes(16), 104)  # answered on the reactor meanwhile
    assert a.error == -errno.EBADF
    go.set()
    done = client.wait(client.q, 200)
    assert {h for h, _, _ in done} == heads
    assert all(struct.unpack_from("<Ii", data) == (16 + fc.ENTRY_SIZE, 0) for _, _, data in done)
    assert client.dev.table.inodes == 2 and client.dev.table.get(2) is not None
    assert client.dev.table.get(2).nlookup == 200  # type: ignore[union-attr]


def test_two_shares_may_not_share_a_tag(tmp_path: Path) -> None:
    from evmm.cli.run_cmd import _fss

    assert [s.tag for s in _fss([f"path={tmp_path},tag=a", f"path={tmp_path},tag=b"])] == ["a", "b"]
    with pytest.raises(ConfigError, match="tag='a' is given to two directories"):
        _fss([f"path={tmp_path},tag=a", f"path={tmp_path}/x,tag=a"])
