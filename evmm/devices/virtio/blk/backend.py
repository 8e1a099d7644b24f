"""The host side of a virtio-blk drive: a raw image file (or block device), and the threads that do its I/O.

Data moves between the image and guest RAM with ``os.preadv``/``os.pwritev`` on memoryviews of guest memory
(zero-copy; the GIL is released for the syscall).  FLUSH is ``fdatasync``; DISCARD and WRITE_ZEROES are
``fallocate(2)``, called through ctypes because Python's ``os.posix_fallocate`` only allocates (mode 0) and
cannot punch holes or zero ranges; ctypes releases the GIL around the call like any foreign function.

Host errors (EIO, ENOSPC, ...) surface as ``OSError`` from these methods; the device turns them into
``VIRTIO_BLK_S_IOERR`` for that one request.

``IoWorkers`` runs blocking calls off the reactor: a few threads take jobs from a queue and put results on a
deque, and an eventfd the reactor watches says "results are waiting".  A worker writes the eventfd only when
the reactor has not yet been told, so a burst of completions costs one wake-up and is published as one batch.
(``scripts/bench_blk.py`` measures this against ``call_soon_threadsafe`` and against Linux AIO.)
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import queue
import select
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from evmm.confine.thread import confine_thread
from evmm.devices.virtio.blk.request import SECTOR_SHIFT
from evmm.devices.virtio.blk.resident import Residency
from evmm.errors import ConfigError

# fallocate(2) modes, from <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_ZERO_CHUNK = 1 << 20
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
# int fallocate(int fd, int mode, off_t offset, off_t len); off_t is 64-bit on x86_64.
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers still to fill after ``n`` bytes went through a short preadv/pwritev."""
    out = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


class FileBackend:
    """An open image: capacity in 512-byte sectors, and blocking I/O calls for the worker threads."""

    def __init__(self, fd: int, path: Path, readonly: bool) -> None:
        self.fd = fd
        self.path = path
        self.readonly = readonly
        # lseek, not st_size: a block device's st_size is 0.
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self.capacity = self.size >> SECTOR_SHIFT
        self._can_punch = True
        self._can_zero_range = True
        self._can_nowait = True
        self._residency: Residency | None = None  # made when RWF_NOWAIT turns out unsupported
        self._residency_failed = False

    @classmethod
    def open(cls, path: Path, readonly: bool) -> FileBackend:
        """Open ``path`` for the guest, or raise ``ConfigError`` with one line naming it."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise ConfigError(f"drive {path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"drive {path}: is a directory, not a disk image") from None
        except OSError as e:
            hint = "" if readonly else "; add readonly=on to attach it read-only"
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                what = "reading" if readonly else "writing"
                raise ConfigError(f"drive {path}: cannot open for {what}: {e.strerror}{hint}") from None
            raise ConfigError(f"drive {path}: cannot open: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise ConfigError(f"drive {path}: is a directory, not a disk image")
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ConfigError(f"drive {path}: is not a regular file or block device")
            return cls(fd, path, readonly)
        except BaseException:
            os.close(fd)
            raise

    def read_cached(self, views: list[memoryview], offset: int) -> bool:
        """Read in place if every byte is in the page cache; False means "give it to a worker".

        ``RWF_NOWAIT`` (preadv2(2)) returns EAGAIN instead of waiting for the disk or a page lock, so this
        is safe on the reactor -- io_uring tries reads the same way before punting them to its workers.  A
        read of 4 KiB from the cache costs ~3 us this way against ~20 us through a worker thread.  Where the
        file system refuses RWF_NOWAIT (tmpfs), mincore(2) says whether the range is resident first
        (``Residency``), and a plain read of it only copies.
        """
        if len(views) > _IOV_MAX:
            return False
        if not self._can_nowait:
            return self._read_resident(views, offset)
        try:
            n = os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in _NOT_SUPPORTED:
                self._can_nowait = False
                return self._read_resident(views, offset)
            return False  # a real error is met again, and reported, by the worker's blocking read
        return n == sum(v.nbytes for v in views)  # short: partly cached, or past the end

    def _read_resident(self, views: list[memoryview], offset: int) -> bool:
        if self._residency is None:
            if not self.size or self._residency_failed:
                return False
            try:
                self._residency = Residency(self.fd, self.size)
            except (OSError, ValueError):  # not mappable (a pipe, a character device): always a worker
                self._residency_failed = True
                return False
        length = sum(v.nbytes for v in views)
        if not self._residency.resident(offset, length):
            return False
        try:
            return os.preadv(self.fd, views, offset) == length
        except OSError:
            return False  # met again, and reported, by the worker's read

    # ---- blocking calls, run on worker threads ------------------------------------------------------------

    def readv(self, views: list[memoryview], offset: int) -> None:
        while views:
            n = os.preadv(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, "the image ended before the request did (was it truncated?)")
            offset += n
            views = _advance(views, n)

    def writev(self, views: list[memoryview], offset: int) -> None:
        while views:
            n = os.pwritev(self.fd, views[:_IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, "the image accepted no bytes")
            offset += n
            views = _advance(views, n)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Give the range's blocks back to the host file system (§5.2.6.2: the device MAY deallocate)."""
        if not self._can_punch:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            self._can_punch = False  # discard is advisory: succeed without freeing anything

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Reads of the range return zeroes afterwards; with ``unmap`` its blocks may be freed (§5.2.6.2)."""
        if unmap and self._can_punch:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                self._can_punch = False
        if self._can_zero_range:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                self._can_zero_range = False
        zeroes = bytes(min(length, _ZERO_CHUNK))
        while length > 0:
            n = os.pwrite(self.fd, zeroes[: min(length, len(zeroes))], offset)
            offset += n
            length -= n

    def close(self) -> None:
        if self._residency is not None:
            self._residency.close()
            self._residency = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


T = TypeVar("T")


class IoWorkers(Generic[T]):
    """A few threads running blocking jobs; results come back to the reactor through one eventfd.

    ``submit`` and ``collect`` are called on the reactor thread only.  Threads start on first use.
    """

    def __init__(self, threads: int, name: str, crashed: Callable[[BaseException], T]) -> None:
        self.threads = threads
        self.name = name
        self._crashed = crashed  # the result of a job that raised (a bug): the job still completes
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs: queue.SimpleQueue[tuple[int, Callable[[], T]] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[int, T]] = collections.deque()
        self._told = False  # the eventfd was written and the reactor has not collected since
        self._pool: list[threading.Thread] = []
        self.pending = 0  # submitted and not yet collected

    def submit(self, token: int, job: Callable[[], T]) -> None:
        if not self._pool:
            self._pool = [
                threading.Thread(target=self._run, name=f"{self.name}-io{i}", daemon=True)
                for i in range(self.threads)
            ]
            for t in self._pool:
                t.start()
        self.pending += 1
        self._jobs.put((token, job))

    def _run(self) -> None:
        confine_thread("io")
        while (item := self._jobs.get()) is not None:
            token, job = item
            try:
                result = job()
            except BaseException as e:  # a result must come back, or a reset would wait for it forever
                result = self._crashed(e)
            self._done.append((token, result))
            # Append first, then test: the reactor clears _told before it drains, so either it sees this
            # result in the drain it is doing, or this thread sees _told False and wakes it again.
            if not self._told:
                self._told = True
                os.eventfd_write(self.fd, 1)

    def collect(self) -> list[tuple[int, T]]:
        """Every result that has come back (reactor thread), in completion order."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        self._told = False
        out = []
        while self._done:
            out.append(self._done.popleft())
        self.pending -= len(out)
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a result is waiting (or ``timeout`` passes); used only to drain at reset."""
        if self._done:
            return True
        readable, _, _ = select.select([self.fd], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        for _ in self._pool:
            self._jobs.put(None)
        for t in self._pool:
            t.join()
        self._pool = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
