"""Where the per-thread hook sits: a vCPU thread and an I/O worker put their filter on before their first
piece of work (a fake confinement records the order; the real filters are in test_seccomp_runtime.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from evmm.confine.thread import set_active
from evmm.devices.bus import Bus
from evmm.devices.virtio.blk.backend import IoWorkers
from evmm.kvm import exits
from evmm.loop.channel import ExitChannel
from evmm.loop.vcpu_thread import VcpuThread


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def install(self, role: str) -> None:
        self.events.append((f"install {role}", threading.get_native_id()))

    def work(self, what: str) -> None:
        self.events.append((what, threading.get_native_id()))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    set_active(r)  # type: ignore[arg-type]
    yield r
    set_active(None)


class FakeVcpu:
    index = 0
    fast_exits = 0

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def set_immediate_exit(self, on: bool) -> None:
        pass

    def run(self) -> Any:
        self.recorder.work("KVM_RUN")
        return exits.Shutdown()


def test_a_vcpu_thread_is_confined_before_its_first_run(recorder: Recorder) -> None:
    loop = asyncio.new_event_loop()
    try:
        stops: list[tuple[int, str]] = []
        t = VcpuThread(
            FakeVcpu(recorder),  # type: ignore[arg-type]
            Bus("pio"),
            Bus("mmio"),
            ExitChannel(loop, "vcpu0"),
            lambda code, why: stops.append((code, why)),
            lambda index, state: None,
        )
        t.start()
        assert t.join(10)
    finally:
        loop.close()
    (first, tid), (second, tid2) = recorder.events
    assert (first, second) == ("install vcpu", "KVM_RUN")
    assert tid == tid2 != threading.get_native_id()  # on the vCPU thread itself
    assert stops and "triple fault" in stops[0][1]


def test_an_io_worker_is_confined_before_its_first_job(recorder: Recorder) -> None:
    workers: IoWorkers[int] = IoWorkers(2, "test", lambda e: -1)
    try:
        for token in range(4):
            workers.submit(token, lambda: recorder.work("job") or 0)  # type: ignore[func-returns-value]
        done: list[tuple[int, int]] = []
        while len(done) < 4:
            assert workers.wait(10)
            done += workers.collect()
    finally:
        workers.close()
    by_thread: dict[int, list[str]] = {}
    for what, tid in recorder.events:
        by_thread.setdefault(tid, []).append(what)
    assert threading.get_native_id() not in by_thread
    for events in by_thread.values():
        assert events[0] == "install io" and events.count("install io") == 1
    assert sum(e.count("job") for e in by_thread.values()) == 4
