"""The 16550A's fast path: THR writes and LSR reads answered in C on the vCPU thread, without the GIL.

Linux's serial console costs two port-I/O exits per byte (read LSR until THRE, write THR).  In Python each
costs a few microseconds natively and ~150 us inside the KVM test host, where a verbose boot was several times
slower than QEMU's.  ``Vcpu.run`` hands the fast path to ``evmm_run_fast`` (evmm/kvm/_build.py), which keeps
re-entering the guest while the exit is one of those two and the UART model has declared it free of side
effects beyond what C does (see ``Serial._sync_fast``).  Everything else reaches Python as before.

The fast path also owns the UART's output ring, so bytes from C and from the Python model stay in order;
the console takes them with ``take`` after the ring's eventfd says it is no longer empty.
"""

from __future__ import annotations

from typing import Any

from evmm.errors import KvmError
from evmm.kvm._ffi import ffi, lib

RING_BYTES = 1 << 16  # drained every few ms by the console; a stalled reader loses output, not the guest
_TAKE_CHUNK = RING_BYTES


class UartFastPath:
    def __init__(self, base: int, wake_fd: int = -1, capacity: int = RING_BYTES) -> None:
        handle = lib.evmm_uart_new(base, wake_fd, capacity)
        if handle == ffi.NULL:
            raise KvmError("cannot allocate the UART fast path")
        # Freed when the last reference goes: vCPU objects hold one, so a vCPU thread that never stopped
        # can never run on freed memory.
        self._handle: Any = ffi.gc(handle, lib.evmm_uart_free)
        self._out = ffi.new("uint8_t[]", _TAKE_CHUNK)
        self.base = base

    @property
    def handle(self) -> Any:
        """For ``Vcpu`` only (cdata stays inside evmm/kvm)."""
        return self._handle

    def set(self, thr_fast: bool, lsr_fast: bool, lsr: int) -> None:
        lib.evmm_uart_set(self._handle, int(thr_fast), int(lsr_fast), lsr & 0xFF)

    def put(self, data: bytes) -> None:
        """Output from the Python model, behind what C already queued."""
        lib.evmm_uart_put(self._handle, data, len(data))

    def take(self) -> bytes:
        """Everything queued so far, oldest first."""
        chunks = []
        while n := lib.evmm_uart_take(self._handle, self._out, _TAKE_CHUNK):
            chunks.append(bytes(ffi.buffer(self._out, n)))
            if n < _TAKE_CHUNK:
                break
        return b"".join(chunks)

    def try_access(self, is_out: bool, port: int, value: int = 0) -> int | None:
        """What ``evmm_run_fast`` does with a one-byte port access, without KVM (for tests): None if the
        access is left to Python, else the byte an IN reads (or the byte an OUT wrote)."""
        data = ffi.new("uint8_t *", value & 0xFF)
        if not lib.evmm_uart_try(self._handle, int(is_out), port, data):
            return None
        return int(data[0])

    @property
    def dropped(self) -> int:
        return int(lib.evmm_uart_dropped(self._handle))
