"""cffi builder for the 16550A's fast path (API mode): serial_fast.c, beside it, as ``_serial_ffi``.

Built with evmm's other bindings (setup.py's ``cffi_modules``).  Only ``serial_fast.py`` imports the result.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()

CDEF = r"""
typedef struct evmm_uart evmm_uart;
evmm_uart *evmm_uart_new(int wake_fd, uint32_t capacity);
void evmm_uart_free(evmm_uart *u);
void evmm_uart_set(evmm_uart *u, int thr_fast, int lsr_fast, uint8_t lsr);
void evmm_uart_put(evmm_uart *u, const uint8_t *data, size_t n);
size_t evmm_uart_take(evmm_uart *u, uint8_t *out, size_t max);
uint64_t evmm_uart_dropped(evmm_uart *u);
int evmm_uart_access(void *ctx, int is_write, uint64_t offset, uint32_t size, uint8_t *data);
"""

ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "evmm.devices.legacy._serial_ffi", Path(__file__).with_name("serial_fast.c").read_text()
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
