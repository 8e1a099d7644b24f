"""Wiring a guest console device (the UART, later hvc0) to host file descriptors on the reactor.

Output: device code calls ``write`` from vCPU threads (the UART runs inline there).  Bytes are appended to a
buffer under a lock, and the reactor is woken only when the buffer goes from empty to non-empty; it then waits
``FLUSH_DELAY`` before taking the buffer, so that a burst of console output (a byte per ~2 UART exits) costs
one wake-up and one write, not one per byte.  Without the delay the reactor woke for every byte, and each
wake-up held the GIL just when the vCPU thread came back from KVM_RUN: a verbose boot in the KVM test host
spent ~390 us per exit instead of ~90 (QEMU's figure there).  A few milliseconds are below what a person at
the console notices.  The reactor writes to the output fd without blocking; a
full pipe holds output in the buffer (bounded: beyond ``MAX_PENDING`` the oldest bytes are dropped and
counted, since a stalled reader must not stall the guest forever).

Input: bytes read from the input fd are offered to the device, which takes what fits in its FIFO; the rest
waits, and reading pauses until the device says it has room again (backpressure instead of loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Protocol

MAX_PENDING = 1 << 20
FLUSH_DELAY = 0.004  # seconds from the first byte of a burst to its write
ESCAPE = 0x1D  # Ctrl-]


class InputSink(Protocol):
    def receive(self, data: bytes) -> int: ...

    def set_rx_space_callback(self, cb: Callable[[], None]) -> None: ...


class ConsoleIO:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        out_fd: int,
        in_fd: int | None,
        *,
        interactive: bool = False,
        on_escape: Callable[[bytes], None] | None = None,
    ) -> None:
        self._loop = loop
        self._out_fd = out_fd
        self._in_fd = in_fd
        self._interactive = interactive
        self._on_escape = on_escape
        self._lock = threading.Lock()
        self._buf = bytearray()  # written by vCPU threads, under _lock
        self._out = bytearray()  # reactor-only: taken from _buf, not yet written to out_fd
        self._writer_armed = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sink: InputSink | None = None
        self._pending_in = b""
        self._reading = False
        self._escape_armed = False
        self._listeners: list[Callable[[bytes], None]] = []
        self._sources: list[Callable[[], bytes]] = []
        # O_NONBLOCK is a property of the open file, shared with the shell that started us: restore it.
        self._saved_blocking = {fd: os.get_blocking(fd) for fd in {out_fd, in_fd} if fd is not None}
        os.set_blocking(out_fd, False)
        loop.add_reader(self._wake, self._on_wake)

    # ---- output: any thread ----------------------------------------------------------------------------

    @property
    def wake_fd(self) -> int:
        """The eventfd that wakes the reactor for output: a source writes it when it stops being empty."""
        return self._wake

    def add_source(self, take: Callable[[], bytes]) -> None:
        """Output that another buffer holds (the UART's C ring): ``take()`` is called on the reactor after
        ``wake_fd`` was written, and returns what is queued."""
        self._sources.append(take)

    def write(self, data: bytes) -> None:
        with self._lock:
            was_empty = not self._buf
            self._buf += data
        if was_empty:
            os.eventfd_write(self._wake, 1)

    # ---- output: reactor -------------------------------------------------------------------------------

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        if self._flush_timer is None:
            self._flush_timer = self._loop.call_later(FLUSH_DELAY, self._deliver)

    def _deliver(self) -> None:
        self._flush_timer = None
        self._take()
        self._flush()

    def add_output_listener(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        """Also give every output chunk to ``listener`` on the reactor (console clients); returns a remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def inject(self, data: bytes) -> None:
        """Input from somewhere other than the input fd (an attached console client), on the reactor."""
        self._pending_in += data
        self._push()

    def _take(self) -> None:
        """Move what vCPU threads wrote to the reactor's side, and hand it to listeners once."""
        with self._lock:
            data = bytes(self._buf)
            self._buf.clear()
        for take in self._sources:
            data += take()
        if not data:
            return
        for listener in list(self._listeners):
            listener(data)
        self._out += data
        if len(self._out) > MAX_PENDING:
            extra = len(self._out) - MAX_PENDING
            del self._out[:extra]
            self.dropped += extra

    def _flush(self) -> None:
        if not self._out:
            return
        try:
            n = os.write(self._out_fd, self._out)
        except BlockingIOError:
            n = 0
        except OSError:  # the reader went away (EPIPE): the guest keeps running, output is discarded
            n = len(self._out)
        del self._out[:n]
        if self._out and not self._writer_armed:
            self._writer_armed = True
            self._loop.add_writer(self._out_fd, self._on_writable)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._out_fd)
        self._writer_armed = False
        self._flush()

    def flush_now(self) -> None:
        """Best-effort blocking flush at shutdown, so the guest's last words reach the user."""
        self._take()
        data = bytes(self._out)
        self._out.clear()
        if data:
            try:
                os.set_blocking(self._out_fd, True)
                os.write(self._out_fd, data)
            except OSError:
                pass

    # ---- input: reactor --------------------------------------------------------------------------------

    def attach_input(self, sink: InputSink) -> None:
        self._sink = sink
        sink.set_rx_space_callback(self._rx_space_threadsafe)
        if self._in_fd is not None:
            os.set_blocking(self._in_fd, False)
            self._start_reading()

    def _start_reading(self) -> None:
        if not self._reading and self._in_fd is not None:
            try:
                self._loop.add_reader(self._in_fd, self._on_input)
            except PermissionError:
                # epoll refuses regular files and /dev/null: take such input whole, as a script for the guest.
                self._slurp()
                return
            self._reading = True

    def _slurp(self) -> None:
        assert self._in_fd is not None
        fd, self._in_fd = self._in_fd, None
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        self._pending_in += b"".join(chunks)
        if self._pending_in:
            self._loop.call_soon(self._push)

    def _stop_reading(self) -> None:
        if self._reading and self._in_fd is not None:
            self._reading = False
            self._loop.remove_reader(self._in_fd)

    def _on_input(self) -> None:
        assert self._in_fd is not None
        try:
            data = os.read(self._in_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: the guest keeps running without input
            self._stop_reading()
            self._in_fd = None
            return
        if self._interactive:
            data = self._filter_escape(data)
        self._pending_in += data
        self._push()

    def _filter_escape(self, data: bytes) -> bytes:
        """In a terminal, Ctrl-] starts an evmm command; Ctrl-] Ctrl-] sends one Ctrl-] to the guest."""
        out = bytearray()
        for b in data:
            if self._escape_armed:
                self._escape_armed = False
                if b == ESCAPE:
                    out.append(b)
                elif self._on_escape is not None:
                    self._on_escape(bytes([b]))
            elif b == ESCAPE:
                self._escape_armed = True
            else:
                out.append(b)
        return bytes(out)

    def _push(self) -> None:
        if self._sink is None or not self._pending_in:
            return
        taken = self._sink.receive(self._pending_in)
        self._pending_in = self._pending_in[taken:]
        if self._pending_in:
            self._stop_reading()  # resume when the device drains its FIFO
        else:
            self._start_reading()

    def _rx_space_threadsafe(self) -> None:
        # Called by the device on whichever thread drained the FIFO (a vCPU thread for the UART).
        if self._pending_in:
            try:
                self._loop.call_soon_threadsafe(self._push)
            except RuntimeError:  # loop closed during shutdown
                pass

    def close(self) -> None:
        self._stop_reading()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._writer_armed:
            self._loop.remove_writer(self._out_fd)
            self._writer_armed = False
        self.flush_now()
        self._loop.remove_reader(self._wake)
        os.close(self._wake)
        for fd, blocking in self._saved_blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
