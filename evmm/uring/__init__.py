"""io_uring (io_uring(7)) for evmm's block I/O: requests queued on the reactor, completions signalled on an eventfd.

The kernel runs each request itself (or on its own io-wq threads where the file system cannot do it without
blocking), so no Python thread and no GIL sit between a request and its completion; the reactor watches
``IoUring.fd`` and reaps.  ``available()`` says whether this host lets evmm have a ring (io_uring can be
disabled: /proc/sys/kernel/io_uring_disabled, seccomp, a container's policy).

The compiled binding (``_build.py``) loads when this package is imported; buffers are memoryviews, and each
stays exported to the kernel from submission to its completion.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from evmm.errors import EvmmError

try:
    from evmm.uring._uring_ffi import ffi, lib
except ImportError as e:  # pragma: no cover - only on an install from before the io_uring binding
    raise EvmmError(
        "evmm's io_uring binding is not compiled: reinstall with `pip install -e .` (needs gcc, linux-libc-dev)"
    ) from e

IOV_MAX = 1024  # readv(2)'s limit, which IORING_OP_READV/WRITEV share


class RingFull(Exception):
    """Every submission entry is taken: submit and reap first."""


class IoUring:
    """One ring: ``readv``/``writev``/``fsync`` queue a request under an integer token, ``submit`` hands the
    queue to the kernel, and ``reap`` returns ``(token, result)`` pairs, the result a byte count or -errno."""

    def __init__(self, entries: int = 128) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = ffi.new("int *")
        ring = lib.evmm_uring_new(entries, self.fd, err)
        if ring == ffi.NULL:
            os.close(self.fd)
            self.fd = -1
            raise OSError(err[0], f"io_uring_setup: {os.strerror(err[0])}")
        self._ring: Any = ring
        self.entries = int(lib.evmm_uring_entries(ring))
        self._held: dict[int, tuple[Any, list[Any]]] = {}  # token -> (iovec array, buffer exports)
        self._tokens = ffi.new("uint64_t[]", 2 * self.entries)
        self._results = ffi.new("int32_t[]", 2 * self.entries)

    @property
    def in_flight(self) -> int:
        """Requests queued or submitted and not yet reaped."""
        return len(self._held)

    def _rw(self, write: bool, token: int, fd: int, views: Sequence[memoryview], offset: int) -> None:
        if token in self._held:
            raise ValueError(f"token {token} is already in flight")
        if not 0 < len(views) <= IOV_MAX:
            raise ValueError(f"{len(views)} buffers: io_uring takes 1 to {IOV_MAX}")
        handles: list[Any] = []
        try:
            for v in views:  # a read into a read-only buffer is a BufferError
                handles.append(ffi.from_buffer(v, require_writable=not write))
        except BaseException:
            for h in handles:
                ffi.release(h)
            raise
        iov = ffi.new("struct iovec[]", len(handles))
        for i, h in enumerate(handles):
            iov[i].iov_base = h
            iov[i].iov_len = len(h)
        if lib.evmm_uring_rw(self._ring, int(write), fd, iov, len(handles), offset, token) != 0:
            for h in handles:
                ffi.release(h)
            raise RingFull(f"the ring's {self.entries} entries are taken")
        self._held[token] = (iov, handles)

    def readv(self, token: int, fd: int, views: Sequence[memoryview], offset: int) -> None:
        """Queue preadv(fd, views, offset); raises ``RingFull`` when there is no entry for it."""
        self._rw(False, token, fd, views, offset)

    def writev(self, token: int, fd: int, views: Sequence[memoryview], offset: int) -> None:
        """Queue pwritev(fd, views, offset); raises ``RingFull`` when there is no entry for it."""
        self._rw(True, token, fd, views, offset)

    def fsync(self, token: int, fd: int, *, datasync: bool = True) -> None:
        """Queue fdatasync(fd) (fsync with ``datasync`` False)."""
        if token in self._held:
            raise ValueError(f"token {token} is already in flight")
        if lib.evmm_uring_fsync(self._ring, fd, int(datasync), token) != 0:
            raise RingFull(f"the ring's {self.entries} entries are taken")
        self._held[token] = (ffi.NULL, [])

    def submit(self, wait: int = 0) -> None:
        """Hand every queued request to the kernel; with ``wait``, return once that many have completed."""
        n = lib.evmm_uring_submit(self._ring, wait)
        if n < 0:
            raise OSError(-n, f"io_uring_enter: {os.strerror(-n)}")

    def reap(self) -> list[tuple[int, int]]:
        """Every completion so far, in order, with its buffers released; clears the eventfd first, so a
        completion that lands after the clear wakes the reactor again."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        out: list[tuple[int, int]] = []
        while n := lib.evmm_uring_reap(self._ring, self._tokens, self._results, 2 * self.entries):
            for i in range(n):
                token = int(self._tokens[i])
                out.append((token, int(self._results[i])))
                _, handles = self._held.pop(token, (None, []))
                for h in handles:
                    ffi.release(h)
        return out

    def close(self) -> list[tuple[int, int]]:
        """Wait for every request in flight (the kernel may be writing into their buffers), free the ring;
        the completions that were still to come."""
        done: list[tuple[int, int]] = []
        if self._ring is None:
            return done
        while self._held:
            self.submit(wait=1)
            done += self.reap()
        lib.evmm_uring_free(self._ring)
        self._ring = None
        os.close(self.fd)
        self.fd = -1
        return done


def available() -> str | None:
    """None where this process may have a ring, else why not (one line)."""
    try:
        IoUring(2).close()
    except OSError as e:
        return f"io_uring: {e.strerror}"
    return None


__all__ = ["IOV_MAX", "IoUring", "RingFull", "available"]
