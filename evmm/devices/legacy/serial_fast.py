"""The 16550A's fast path: THR writes and LSR reads answered in C on the vCPU thread, without the GIL.

Linux's serial console costs two port-I/O exits per byte (read LSR until THRE, write THR).  In Python each
costs a few microseconds natively and ~150 us inside the KVM test host, where a verbose boot was several times
slower than QEMU's.  ``UartFastPath`` is an exit hook for the vCPU's KVM_RUN loop (evmm/kvm: ``ExitHook``):
the loop keeps re-entering the guest while ``evmm_uart_access`` (serial_fast.c) answers the exit, which it
does for those two accesses when the UART model has declared them free of side effects beyond what C does
(see ``Serial._sync_fast``).  Everything else reaches the model as before.

The fast path also owns the UART's output ring, so bytes from C and from the Python model stay in order;
the console takes them with ``take`` after the ring's eventfd says it is no longer empty.
"""

from __future__ import annotations

from typing import Any

from evmm.devices.legacy.serial import REGISTER_COUNT
from evmm.errors import EvmmError

try:
    from evmm.devices.legacy._serial_ffi import ffi, lib
except ImportError as e:  # pragma: no cover - only on a broken install
    raise EvmmError(
        "evmm's UART fast path is not compiled: reinstall with `pip install -e .` (needs gcc)"
    ) from e

RING_BYTES = 1 << 16  # drained every few ms by the console; a stalled reader loses output, not the guest
_TAKE_CHUNK = RING_BYTES


class UartFastPath:
    """The C half of one UART at port ``base``, as an exit hook of every vCPU (``Vcpu.set_exit_hooks``)."""

    pio = True
    length = REGISTER_COUNT

    def __init__(self, base: int, wake_fd: int = -1, capacity: int = RING_BYTES) -> None:
        handle = lib.evmm_uart_new(wake_fd, capacity)
        if handle == ffi.NULL:
            raise MemoryError("cannot allocate the UART fast path")
        # Freed when the last reference goes: a vCPU holds one while it may call the hook, so a vCPU thread
        # that never stopped can never run on freed memory.
        self._handle: Any = ffi.gc(handle, lib.evmm_uart_free)
        self._out = ffi.new("uint8_t[]", _TAKE_CHUNK)
        self.base = base

    # ---- ExitHook: what the KVM_RUN loop calls, as addresses (no cdata crosses into evmm/kvm) -------------

    @property
    def c_function(self) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, "evmm_uart_access")))

    @property
    def c_context(self) -> int:
        return int(ffi.cast("uintptr_t", self._handle))

    # ---- the model's side ----------------------------------------------------------------------------

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

    def try_access(self, is_write: bool, offset: int, value: int = 0, size: int = 1) -> int | None:
        """What the KVM_RUN loop's call of the hook does with an access, without KVM (for tests): None if the
        access is left to Python, else the byte a read returns (or the byte a write wrote)."""
        data = ffi.new("uint8_t[8]", list((value & ((1 << (8 * size)) - 1)).to_bytes(8, "little")))
        if not lib.evmm_uart_access(self._handle, int(is_write), offset, size, data):
            return None
        return int(data[0])

    @property
    def dropped(self) -> int:
        return int(lib.evmm_uart_dropped(self._handle))
