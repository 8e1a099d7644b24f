"""The POST port sink and the boot-timer marker register."""

from __future__ import annotations

import threading

from evmm.devices.boot_timer import BOOT_MARKER, BootTimer
from evmm.devices.legacy.debug_port import DebugPort
from tests.fakes.devices import CallCounter


def test_debug_port_reads_float_high_and_counts_writes() -> None:
    port = DebugPort()
    assert port.read(0, 1) == 0xFF
    assert port.read(0, 2) == 0xFFFF
    assert port.writes == 0
    assert port.last_code is None
    port.write(0, 1, 0x00)  # native_io_delay()
    port.write(0, 1, 0x42)
    assert port.writes == 2
    assert port.last_code == 0x42


def test_debug_port_counts_writes_from_several_threads() -> None:
    port = DebugPort()

    def vcpu() -> None:
        for i in range(1000):
            port.write(0, 1, i)

    threads = [threading.Thread(target=vcpu) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert port.writes == 4000


def test_boot_marker_fires_once() -> None:
    marker = CallCounter()
    timer = BootTimer(marker)
    timer.write(0, 1, BOOT_MARKER)
    timer.write(0, 1, BOOT_MARKER)
    assert marker.count == 1
    assert timer.read(0, 1) == 0


def test_only_a_one_byte_marker_at_offset_zero_counts() -> None:
    marker = CallCounter()
    timer = BootTimer(marker)
    timer.write(0, 1, BOOT_MARKER + 1)
    timer.write(0, 4, BOOT_MARKER)
    timer.write(1, 1, BOOT_MARKER)
    assert marker.count == 0
    timer.write(0, 1, BOOT_MARKER)
    assert marker.count == 1


def test_boot_marker_fires_once_across_vcpu_threads() -> None:
    marker = CallCounter()
    timer = BootTimer(marker)
    start = threading.Barrier(8)

    def vcpu() -> None:
        start.wait()
        for _ in range(100):
            timer.write(0, 1, BOOT_MARKER)

    threads = [threading.Thread(target=vcpu) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert marker.count == 1
