"""The vCPU -> reactor hand-off: answers, exceptions, and release of a waiting vCPU at shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from evmm.loop.channel import ChannelClosed, ExitChannel


def test_call_runs_on_the_reactor_and_returns_its_result(loop: asyncio.AbstractEventLoop) -> None:
    ch = ExitChannel(loop, "vcpu0")
    results: list[object] = []

    def vcpu() -> None:
        results.append(ch.call(lambda a, b: (threading.current_thread().name, a + b), 2, 3))
        try:
            ch.call(lambda: 1 / 0)
        except ZeroDivisionError as e:
            results.append(type(e))
        loop.call_soon_threadsafe(loop.stop)

    t = threading.Thread(target=vcpu, name="vcpu0")
    t.start()
    loop.run_forever()
    t.join()
    assert results == [(threading.current_thread().name, 5), ZeroDivisionError]
    ch.close()


def test_close_releases_a_vcpu_waiting_for_an_answer(loop: asyncio.AbstractEventLoop) -> None:
    ch = ExitChannel(loop, "vcpu0")
    outcome: list[str] = []
    posted = threading.Event()

    def vcpu() -> None:
        posted.set()
        try:
            ch.call(lambda: "never answered")
        except ChannelClosed:
            outcome.append("released")

    # The reactor closes the channel before it ever runs the request.
    t = threading.Thread(target=vcpu)
    t.start()
    posted.wait()
    while ch._request is None:  # the request is posted
        pass
    ch.close()
    t.join(5)
    assert outcome == ["released"]
    with pytest.raises(ChannelClosed):
        ch.call(lambda: None)
