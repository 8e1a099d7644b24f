"""The machine's lifecycle: stop requests and the boot marker, from any part and any thread, before or after
the machine attached."""

from __future__ import annotations

import threading

from evmm.loop.vcpu_thread import StopRequest
from evmm.machine.lifecycle import Lifecycle


def test_the_first_stop_wins_and_reaches_the_machine_once() -> None:
    life = Lifecycle()
    stops: list[StopRequest] = []
    life.attach(stops.append, lambda at: None)
    life.stop(3, "guest reset")
    life.stop(0, "guest powered off")
    assert stops == [StopRequest(3, "guest reset")]
    assert life.stop_request == StopRequest(3, "guest reset")


def test_a_request_made_before_the_machine_attached_is_delivered_when_it_does() -> None:
    life = Lifecycle()
    life.stop(4, "the guest crashed")
    life.boot_marker()
    stops: list[StopRequest] = []
    booted: list[float] = []
    life.attach(stops.append, booted.append)
    assert stops == [StopRequest(4, "the guest crashed")]
    assert booted == [life.boot_marker_at]


def test_only_the_first_boot_marker_counts() -> None:
    life = Lifecycle()
    booted: list[float] = []
    life.attach(lambda r: None, booted.append)
    life.boot_marker()
    first = life.boot_marker_at
    life.boot_marker()
    assert booted == [first] and life.boot_marker_at == first


def test_racing_stops_from_many_threads_deliver_exactly_one() -> None:
    life = Lifecycle()
    stops: list[StopRequest] = []
    life.attach(stops.append, lambda at: None)
    start = threading.Barrier(8)

    def vcpu(i: int) -> None:
        start.wait()
        life.stop(i, f"vCPU {i}")

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stops) == 1 and stops[0] == life.stop_request
