"""What the fuzz targets found, one test each: the input as the fuzzer met it, and the behaviour it broke."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from evmm.devices.virtio import mmio as regs
from evmm.devices.virtio.console import RECEIVEQ, VirtioConsole
from evmm.devices.virtio.console_backend import FdBackend
from tests.fakes.virtio_driver import MmioDriver
from tests.fuzz.targets import mmio_console

# mmio_console, seed 0: the RX ring's avail index 62148 ahead of the device's, then host input.
CONSOLE_AVAIL_JUMP = bytes.fromhex(
    "323445ce9386df2e80efa3e89b1eb3f302e34afe3823e4a18a0afd24bc1d46c8f19ef420f5005f5debffcd323445ce9386df2e80"
    "efa3e89b1eb3f302e34afe3823babaf895e62129083a2197032442c569c0d751a692fb64b54985c4f230ae71ff1a07dd1b6f3735"
    "fd75496f62b7c3b58754955a56622cc9122b2b76a854fd2df56b19a7e3a599f6aee55425feaf79df6d6f9d97e425a9b88172cb4b"
    "e8ee6ebc75b56a9bc225e1782f862413ea50d6c21421663f7835f8790fe9f2b9d32fe421b271b3056359ad0912ca929ec5fb"
)


def test_console_input_into_a_garbage_rx_ring_replayed() -> None:
    mmio_console(CONSOLE_AVAIL_JUMP)  # raised QueueBroken out of a reactor callback


def test_console_input_into_a_garbage_rx_ring_breaks_the_device_not_the_reactor() -> None:
    """Host input reaches _fill_rx from the backend's reader, not from a kick, so nothing caught a
    QueueBroken there: it escaped into the event loop (a traceback on evmm's console, the reader still
    armed).  Now the device needs a reset (§2.1.2) and stops reading its input."""
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        d = MmioDriver(VirtioConsole(FdBackend(r, out_w)), loop=loop)
        d.bring_up(16)
        rx = d.queues[RECEIVEQ]
        d.mem.write_u16(rx.avail + 2, 62148)  # a driver "making available" 62148 buffers in a ring of 16
        os.write(w, b"typed at the host\n")
        for _ in range(5):
            loop.run_until_complete(asyncio.sleep(0.001))
        assert errors == []
        assert d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
        d.w(regs.STATUS, 0)  # the driver's way out: a reset, and the device works again
        d.bring_up(16)
        assert not d.r(regs.STATUS) & regs.DEVICE_NEEDS_RESET
    finally:
        loop.close()
        for fd in (r, w, out_r, out_w):
            os.close(fd)
