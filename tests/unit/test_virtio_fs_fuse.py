"""The FUSE wire parser and encoder (evmm/devices/virtio/fs/fuse.py), fuzzed: whatever bytes a guest sends,
parsing returns a request or a BadRequest with an errno, never raises; what it accepts is what was sent."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evmm.devices.virtio.fs import fuse, make_fs
from evmm.machine.devspec import FsSpec
from tests.fakes import fuse_client as fc
from tests.fakes.fuse_client import ROOT, FuseClient

OPCODES = st.one_of(st.integers(0, 60), st.integers(0, 0xFFFFFFFF))
NAME_OK = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


def header(opcode: int, length: int = 0) -> fuse.InHeader:
    return fuse.InHeader(length, opcode, 7, 1, 0, 0, 0)


@given(OPCODES, st.binary(max_size=600))
@settings(max_examples=1500)
def test_any_bytes_parse_or_fail_with_an_errno(opcode: int, body: bytes) -> None:
    r = fuse.parse_request(header(opcode), body)
    if isinstance(r, fuse.BadRequest):
        assert r.errno in (errno.EINVAL, errno.ENOSYS, errno.ENAMETOOLONG, errno.E2BIG, errno.ENOENT)
        assert r.reason
    else:
        assert r.header.opcode == opcode
        for name in _names(r.args):
            assert name and b"/" not in name and b"\0" not in name and name not in (b".", b"..")
            assert len(name) <= fuse.NAME_MAX


def _names(args: fuse.Args) -> list[bytes]:
    if isinstance(args, (fuse.Named, fuse.Mknod, fuse.Create, fuse.Symlink, fuse.Link)):
        return [args.name]
    if isinstance(args, fuse.Rename):
        return [args.name, args.newname]
    return []


@given(st.binary(max_size=80))
def test_header_parse(data: bytes) -> None:
    h = fuse.parse_header(data)
    if len(data) < 40:
        assert isinstance(h, fuse.BadRequest)
    else:
        assert isinstance(h, fuse.InHeader)
        assert (
            struct.pack("<IIQQIII", h.length, h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid) == data[:36]
        )


@given(NAME_OK, NAME_OK, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_rename2_round_trip(old: bytes, new: bytes, newdir: int, flags: int) -> None:
    body = struct.pack("<QII", newdir, flags, 0) + old + b"\0" + new + b"\0"
    r = fuse.parse_request(header(fuse.RENAME2), body)
    assert isinstance(r, fuse.Request) and r.args == fuse.Rename(old, newdir, new, flags)


@given(NAME_OK, st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" not in b))
def test_symlink_round_trip(name: bytes, target: bytes) -> None:
    r = fuse.parse_request(header(fuse.SYMLINK), name + b"\0" + target + b"\0")
    assert isinstance(r, fuse.Request) and r.args == fuse.Symlink(name, target)


@given(
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=50), st.integers(0, 60)
)
def test_batch_forget_counts_are_checked(items: list[tuple[int, int]], claimed_extra: int) -> None:
    body = struct.pack("<II", len(items) + claimed_extra, 0) + b"".join(struct.pack("<QQ", *i) for i in items)
    r = fuse.parse_request(header(fuse.BATCH_FORGET), body)
    if claimed_extra:
        assert isinstance(r, fuse.BadRequest)
    else:
        assert isinstance(r, fuse.Request) and r.args == fuse.Forget(tuple(items))


@given(st.binary(min_size=1, max_size=300))
def test_bad_names_are_refused(raw: bytes) -> None:
    r = fuse.parse_request(header(fuse.LOOKUP), raw + b"\0")
    name = raw.split(b"\0")[0]  # a C string: it ends at its first NUL
    ok = b"/" not in name and name not in (b"", b".", b"..") and len(name) <= 255
    assert isinstance(r, fuse.Request) == ok
    if isinstance(r, fuse.Request):
        assert r.args == fuse.Named(name)


@given(st.binary(min_size=1, max_size=300), st.integers(0, 2**63 - 1), st.booleans())
def test_dirent_records_are_padded_to_8(name: bytes, off: int, plus: bool) -> None:
    rec = fuse.dirent(5, off, 8, name)
    if plus:
        rec = fuse.direntplus(bytes(fuse.ENTRY_OUT_SIZE), 5, off, 8, name)
    assert len(rec) == fuse.dirent_size(name, plus) and len(rec) % 8 == 0


def test_encoded_sizes_match_fuse_h() -> None:
    st_ = os.stat("/")
    assert len(fuse.attr(st_)) == 88
    assert len(fuse.entry(2, st_, 1.5, 0.25)) == fuse.ENTRY_OUT_SIZE == 128
    assert struct.unpack_from("<QQQQII", fuse.entry(2, st_, 1.5, 0.25)) == (
        2,
        0,
        1,
        0,
        500_000_000,
        250_000_000,
    )
    assert len(fuse.attr_out(st_, 1.0)) == fuse.ATTR_OUT_SIZE == 104
    assert len(fuse.init_out(0, 0, 0, 0)) == 64
    assert len(fuse.statfs_out(os.statvfs("/"))) == 80
    assert fuse.out_header(9, errno.ENOENT, 0) == struct.pack("<IiQ", 16, -errno.ENOENT, 9)


# ---- the whole device under random requests ------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(OPCODES, st.integers(0, 2**64 - 1), st.binary(max_size=300), st.integers(0, 4200)),
        min_size=1,
        max_size=12,
    )
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_requests_are_each_answered_and_the_device_goes_on(
    tmp_path: Path, requests: list[tuple[int, int, bytes, int]]
) -> None:
    share = tmp_path / "fuzz"
    share.mkdir(exist_ok=True)
    (share / "f").write_bytes(b"x" * 100)
    loop = asyncio.new_event_loop()
    c = FuseClient(make_fs(FsSpec(share, "fuzz")), loop)
    try:
        c.init()
        heads = []
        for opcode, nodeid, body, out_size in requests:
            if opcode in (fc.FORGET, fc.BATCH_FORGET, fc.INIT, fc.DESTROY):
                continue  # they change the session itself; the parser tests cover their arguments
            hdr = fc.IN_HEADER.pack(40 + len(body), opcode, 3, nodeid % 8, 0, 0, 0, 0, 0)
            heads.append(c.q.add([hdr, body] if body else [hdr], [16, out_size] if out_size else [16]))
        c.drv.kick(1)
        used = c.wait(c.q, len(heads))
        assert sorted(h for h, _, _ in used) == sorted(heads)
        for _h, length, data in used:
            assert length >= 16
            out_len, error, unique = struct.unpack_from("<IiQ", data)
            assert out_len == length and unique == 3 and error <= 0
        assert c.getattr(ROOT).mode & 0o040000
        assert sorted(os.listdir(tmp_path)) == ["fuzz"]  # nothing created outside the share
    finally:
        c.dev.close()
        loop.close()
        for p in sorted(share.rglob("*"), reverse=True):
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
