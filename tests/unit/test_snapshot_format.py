"""The snapshot state file (evmm/snapshot/format.py) and the memory file (memfile.py), without KVM.

A state file reads back what was written; truncated, corrupted, another format's or another evmm version's
is refused in one line naming the file.  Guest RAM goes to a sparse file (holes where the guest never wrote,
and where it wrote only zeroes), comes back MAP_PRIVATE (the file is never written), and RAM restored that way
saves again whole, including pages the guest never touched since.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import threading
from pathlib import Path

import pytest

from evmm.memory import GuestMemory
from evmm.snapshot import format as fmt
from evmm.snapshot import memfile
from evmm.snapshot.format import Fields, SnapshotError
from evmm.snapshot.memfile import PAGE, load_memory


def save_memory(mem: GuestMemory, directory: Path) -> int:
    return asyncio.run(memfile.save_memory(mem, directory))


BODY = {"config": {"memory": 1 << 20, "name": "x"}, "blob": b"\x00\x01\xff", "list": [1, 2, [3]]}


def test_a_state_file_reads_back_what_was_written(tmp_path: Path) -> None:
    fmt.write_state(tmp_path, BODY)
    body = fmt.read_state(tmp_path)
    assert {k: body[k] for k in BODY} == BODY
    assert (body["evmm"], body["format"]) == (fmt.evmm_version(), fmt.FORMAT)


def reseal(data: bytes, **changes: object) -> bytes:
    """The state file with its body changed and a valid checksum: only the version check can refuse it."""
    import msgpack  # type: ignore[import-untyped]

    header = struct.Struct("<8sIQ32s")
    body = msgpack.unpackb(data[header.size :], raw=False)
    body.update(changes)
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return header.pack(fmt.MAGIC, fmt.FORMAT, len(payload), hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[: len(d) - 7], r"truncated \(\d+ of \d+ bytes after the header\)"),
        (lambda d: d[:30], r"not an evmm snapshot state file"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 0x40]), r"corrupted \(its SHA-256 does not match"),
        (lambda d: d + b"x", r"corrupted"),
        (lambda d: b"NOTEVMM!" + d[8:], r"not an evmm snapshot state file"),
        (
            lambda d: d[:8] + struct.pack("<I", 99) + d[12:],
            r"snapshot format 99, this evmm \(.*\) reads format 1",
        ),
        (lambda d: reseal(d, evmm="0.0.1"), r"made by evmm 0.0.1; this is evmm .*, which loads its own"),
    ],
)
def test_a_damaged_or_foreign_state_file_is_one_line(tmp_path: Path, damage: object, message: str) -> None:
    fmt.write_state(tmp_path, BODY)
    path = tmp_path / fmt.STATE_FILE
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message) as e:
        fmt.read_state(tmp_path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_missing_directory_or_state_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match=r"snapshot .*/nope: no such directory"):
        fmt.read_state(tmp_path / "nope")
    with pytest.raises(SnapshotError, match=r"no state.evmm in it \(not a snapshot directory\)"):
        fmt.read_state(tmp_path)


def test_fields_name_what_is_missing_or_mistyped() -> None:
    f = Fields({"a": 1, "b": "x", "t": True, "m": {"v": 2}}, "snapshot D: rtc")
    assert f.integer("a") == 1 and f.text("b") == "x" and f.boolean("t") is True
    with pytest.raises(SnapshotError, match=r"^snapshot D: rtc: no 'z'$"):
        f.integer("z")
    with pytest.raises(SnapshotError, match=r"'b' is not an integer"):
        f.integer("b")
    with pytest.raises(SnapshotError, match=r"'t' is not an integer"):
        f.integer("t")  # a bool is not an int here
    with pytest.raises(
        SnapshotError, match=r"snapshot D: rtc: m: state version 2; this evmm restores version 1"
    ):
        f.map("m").version(1)


# ---- memory -----------------------------------------------------------------------------------------------

LAYOUT = [(0, 64 * PAGE), (1 << 32, 16 * PAGE)]


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_memory_goes_to_a_sparse_file_with_holes_where_nothing_was_written(tmp_path: Path) -> None:
    mem = GuestMemory.anonymous(LAYOUT)
    mem.write(3 * PAGE + 5, b"hello")
    mem.write(10 * PAGE, b"\0" * PAGE)  # touched, but only zeroes: a hole too
    mem.write((1 << 32) + 15 * PAGE, b"end")
    written = save_memory(mem, tmp_path)
    path = tmp_path / fmt.MEMORY_FILE
    assert path.stat().st_size == 80 * PAGE
    assert written == 2 * PAGE
    assert allocated(path) <= 2 * PAGE + 8192  # two pages of data (a file system may round up a little)
    data = path.read_bytes()
    assert data[3 * PAGE + 5 : 3 * PAGE + 10] == b"hello"
    assert data[64 * PAGE + 15 * PAGE : 64 * PAGE + 15 * PAGE + 3] == b"end"
    mem.close()


def test_restored_memory_is_private_and_saves_again_whole(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    mem = GuestMemory.anonymous(LAYOUT)
    for page in (1, 7, 63):
        mem.write(page * PAGE, bytes([page]) * 8)
    mem.write((1 << 32) + 2 * PAGE, b"high")
    save_memory(mem, first)
    before = (first / fmt.MEMORY_FILE).read_bytes()

    restored = load_memory(first, LAYOUT)
    assert restored.read(7 * PAGE, 8) == bytes([7]) * 8
    restored.write(7 * PAGE, b"changed!")  # a private copy: the file must not change
    restored.write(20 * PAGE, b"new page")
    assert (first / fmt.MEMORY_FILE).read_bytes() == before
    # Saved again without touching pages 1, 63 and the high one since the restore: they are the old file's.
    save_memory(restored, second)
    again = (second / fmt.MEMORY_FILE).read_bytes()
    assert again[PAGE : PAGE + 8] == bytes([1]) * 8
    assert again[63 * PAGE : 63 * PAGE + 8] == bytes([63]) * 8
    assert again[64 * PAGE + 2 * PAGE : 64 * PAGE + 2 * PAGE + 4] == b"high"
    assert again[7 * PAGE : 7 * PAGE + 8] == b"changed!" and again[20 * PAGE : 20 * PAGE + 8] == b"new page"
    restored.close()
    mem.close()


def test_saving_over_a_memory_file_someone_maps_leaves_their_pages_alone(tmp_path: Path) -> None:
    mem = GuestMemory.anonymous(LAYOUT)
    mem.write(0, b"generation 1")
    save_memory(mem, tmp_path)
    clone = load_memory(tmp_path, LAYOUT)
    mem.write(0, b"generation 2")
    save_memory(mem, tmp_path)  # renamed over the file the clone maps
    assert clone.read(0, 12) == b"generation 1"
    assert load_memory(tmp_path, LAYOUT).read(0, 12) == b"generation 2"


def test_a_memory_file_of_the_wrong_size_is_one_line(tmp_path: Path) -> None:
    mem = GuestMemory.anonymous(LAYOUT)
    save_memory(mem, tmp_path)
    os.truncate(tmp_path / fmt.MEMORY_FILE, 10 * PAGE)
    with pytest.raises(
        SnapshotError, match=r"memory: 40960 bytes, the snapshot's guest RAM is 327680 \(truncated"
    ):
        load_memory(tmp_path, LAYOUT)
    (tmp_path / fmt.MEMORY_FILE).unlink()
    with pytest.raises(SnapshotError, match=r"no memory file in it"):
        load_memory(tmp_path, LAYOUT)


def test_memory_is_written_on_a_worker_while_the_reactor_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    mem = GuestMemory.anonymous(LAYOUT)
    mem.write(5 * PAGE, b"saved")
    ticked = threading.Event()
    real = memfile.write_memory

    def slow_writer(memory: GuestMemory, fd: int) -> int:
        # Goes on only once a timer of the event loop has run meanwhile: a write made on the reactor itself
        # would wait here in vain, as the control channel and the consoles would while it ran.
        if not ticked.wait(10):
            raise AssertionError("the event loop ran no timer while guest memory was being written")
        assert threading.current_thread() is not threading.main_thread()
        return real(memory, fd)

    monkeypatch.setattr(memfile, "write_memory", slow_writer)
    loop.call_later(0.01, ticked.set)
    assert loop.run_until_complete(memfile.save_memory(mem, tmp_path)) == PAGE
    assert load_memory(tmp_path, LAYOUT).read(5 * PAGE, 5) == b"saved"
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.MEMORY_FILE]
    mem.close()


def test_a_memory_write_that_fails_on_the_worker_is_one_line_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: asyncio.AbstractEventLoop
) -> None:
    def full(memory: GuestMemory, fd: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memfile, "write_memory", full)
    mem = GuestMemory.anonymous(LAYOUT)
    with pytest.raises(SnapshotError, match=r"^snapshot .*: writing guest memory: No space left on device$"):
        loop.run_until_complete(memfile.save_memory(mem, tmp_path))
    assert list(tmp_path.iterdir()) == []
    mem.close()
