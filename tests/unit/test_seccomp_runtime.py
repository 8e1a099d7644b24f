"""Installing the filters in a running evmm: the main thread's checks, the SIGSYS line, ``--seccomp``'s
default, and the trace summariser the lists are measured with."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from evmm.confine.trace import Count, parse, roles, summarise
from evmm.exitcodes import EXIT_SECCOMP

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_main_filter_waits_for_the_vcpu_threads_then_goes_on() -> None:
    r = _python(
        """
        import os, threading
        from evmm.confine import seccomp
        from evmm.confine.thread import confine_thread
        seccomp.enable(seccomp.Mode.KILL, seccomp.Features())
        go = threading.Event()
        def vcpu():
            confine_thread("vcpu")
            go.wait()
        t = threading.Thread(target=vcpu); t.start()
        stops = []
        seccomp.confine_main(lambda code, why: stops.append((code, why)))
        print("stops", stops, flush=True)
        go.set(); t.join()
        os.getppid()  # no role allows it
        print("not reached", flush=True)
        """
    )
    assert r.returncode == EXIT_SECCOMP, r.stderr
    assert "stops []" in r.stdout and "not reached" not in r.stdout
    assert "(role main, tid " in r.stderr and "getppid(" in r.stderr


def test_a_thread_without_a_filter_stops_the_machine_naming_it() -> None:
    r = _python(
        """
        import threading
        from evmm.confine import seccomp
        from evmm.confine.thread import confine_thread
        from evmm.loop.vcpu_thread import name_os_thread
        seccomp.enable(seccomp.Mode.KILL, seccomp.Features())
        seccomp.THREAD_WAIT = 0.2
        go = threading.Event()
        def rogue():
            name_os_thread("rogue")
            go.wait()
        t = threading.Thread(target=rogue); t.start()
        stops = []
        seccomp.confine_main(lambda code, why: stops.append((code, why)))
        go.set(); t.join()
        print(stops)
        """
    )
    assert r.returncode == 0, r.stderr
    assert f"[({EXIT_SECCOMP}, 'seccomp: thread " in r.stdout
    assert "(rogue) runs without a filter" in r.stdout


def test_a_bad_evmm_seccomp_default_is_one_line() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "evmm", "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "EVMM_SECCOMP": "maybe"},
    )
    assert r.returncode == 1
    assert r.stderr == "evmm: EVMM_SECCOMP='maybe': not kill, log or off\n"


BPFTRACE = """\
Attaching 7 probes...
=== evmm-trace snapshot
@calls[100, 100, python, 1000, 232]: 5
=== evmm-trace snapshot
@calls[100, 100, python, 1000, 232]: 50
@calls[100, 100, python, 1000, 16]: 7
@calls[100, 101, evmm-vcpu0, 2000, 16]: 900
@calls[100, 102, python, 1000, 273]: 1
@calls[100, 102, python, 3000, 295]: 40
@args[100, 101, evmm-vcpu0, 2000, 16, 44672]: 900
"""


def test_the_trace_charges_each_call_to_the_filter_that_saw_it() -> None:
    counts = parse(BPFTRACE)
    assert Count(100, 100, "python", 1000, 232, None, 50) in counts  # the last snapshot, not the first
    assert roles(counts) == {(100, 1000): "main", (100, 2000): "vcpu", (100, 3000): "io"}
    s = summarise(counts)
    assert s.calls["main"] == {"epoll_wait": 50, "ioctl": 7, "set_robust_list": 1}  # a new thread's start
    assert s.calls["vcpu"] == {"ioctl": 900}
    assert s.calls["io"] == {"preadv": 40}
    assert s.args["vcpu"] == {"ioctl 0xae80": 900}
    assert s.processes == 1


def test_the_event_loop_gets_no_io_uring_and_still_works() -> None:
    """libuv would batch epoll_ctl through an io_uring the filters cannot see into: enable() refuses it."""
    r = _python(
        """
        import asyncio, os, socket
        from evmm.confine import seccomp
        seccomp.enable(seccomp.Mode.KILL, seccomp.Features())
        import uvloop
        loop = uvloop.new_event_loop()
        a, b = socket.socketpair()
        async def main():
            fut = loop.create_future()
            loop.add_reader(a.fileno(), lambda: fut.done() or fut.set_result(a.recv(1)))
            b.send(b"x")
            print("read", await fut, flush=True)
            loop.remove_reader(a.fileno())
        loop.run_until_complete(main())
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass  # listdir's own fd, closed by now
        print("fds", sorted(links))
        """
    )
    assert r.returncode == 0, r.stderr
    assert "read b'x'" in r.stdout
    assert "io_uring" not in r.stdout  # no ring among the process's fds
