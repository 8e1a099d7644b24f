"""evmm-oci under the container engines, in the KVM test host (issue 16, "Done means").

Each engine is started by the test (tests/linux/engines.py) with evmm-oci registered next to runc.  The
default run has one end-to-end test per engine: runc first (the floor: engine, image and host are sound),
then evmm-oci, ``run --rm IMG sh -c '...; exit 3'`` giving 3 and the output in order.  The slower scenarios
carry ``@pytest.mark.engines`` and run with ``-m engines``.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.linux.engines import IMAGE, Containerd, Engine, engine, evmm_oci_missing, missing, run

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")
ENGINE_NAMES = ["docker", "podman", "containerd"]
SCRIPT = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; echo done; exit 3"


def run_argv(eng: Engine, runtime: str, name: str, *command: str, options: tuple[str, ...] = ()) -> list[str]:
    """``run --rm IMAGE COMMAND`` through ``eng`` (ctr also wants a container id after the image)."""
    if isinstance(eng, Containerd):
        return eng.run_argv(runtime, *options, "--rm", IMAGE, name, *command)
    return eng.run_argv(runtime, *options, "--rm", IMAGE, *command)


@pytest.mark.cost(600)
# podman in the default run (no daemon to start: the cheapest end-to-end path through an engine); docker and
# containerd with -m slow.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n == "podman" else pytest.mark.slow) for n in ENGINE_NAMES]
)
def test_run_exit_code_and_output(name: str) -> None:
    with engine(name) as eng:
        floor = run(run_argv(eng, "runc", "floor", "sh", "-c", SCRIPT), check=False)
        assert floor.returncode == 3, floor.stderr
        assert floor.stdout.split() == ["out1", "out2", "out3", "done"]
        if (why := evmm_oci_missing()) is not None:
            pytest.skip(why)
        r = run(run_argv(eng, "evmm", "vm", "sh", "-c", SCRIPT), check=False)
        assert r.returncode == 3, r.stderr
        assert r.stdout.split() == ["out1", "out2", "out3", "done"]
        assert [w for w in r.stderr.split() if w.startswith("err")] == ["err1", "err2", "err3"]


# ---- the slower scenarios (-m engines) --------------------------------------------------------------------

DOCKERLIKE = ["docker", "podman"]
BOOT = 600.0  # seconds for a container's VM to be up, in a busy TCG test host


def detached(eng: Engine, *args: str) -> str:
    """``run -d`` with evmm-oci; the container's id."""
    return run(eng.run_argv("evmm", "-d", *args)).stdout.strip()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = BOOT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def logs(eng: Engine, cid: str) -> str:
    r = eng.cli("logs", cid, check=False)
    return r.stdout + r.stderr


@pytest.mark.engines
@pytest.mark.cost(1800)
@pytest.mark.parametrize("name", DOCKERLIKE)
def test_exec_stop_logs_volume_cp(name: str, tmp_path: Path) -> None:
    if (why := evmm_oci_missing()) is not None:
        pytest.skip(why)
    with engine(name) as eng:
        assert not isinstance(eng, Containerd)
        # exec into a running container
        cid = detached(eng, IMAGE, "sh", "-c", "echo up; sleep 1000")
        wait_for(lambda: "up" in logs(eng, cid), "the container's first output")
        r = eng.cli("exec", cid, "sh", "-c", "echo from-exec $(hostname); exit 4", check=False)
        assert r.returncode == 4 and "from-exec" in r.stdout, r.stderr
        # stop: pid 1 without a handler ignores SIGTERM, so the engine's SIGKILL after the timeout ends it
        start = time.monotonic()
        eng.cli("stop", "-t", "3", cid)
        assert eng.cli("wait", cid).stdout.strip() == "137"
        assert time.monotonic() - start >= 3
        # stop: a handler for SIGTERM is honoured
        cid = detached(
            eng, IMAGE, "sh", "-c", "trap 'echo bye; exit 7' TERM; echo up; while :; do sleep 1; done"
        )
        wait_for(lambda: "up" in logs(eng, cid), "the trapping container's first output")
        eng.cli("stop", "-t", "120", cid)
        assert eng.cli("wait", cid).stdout.strip() == "7"
        assert "bye" in logs(eng, cid)
        # a volume written in the container, read on the host; a file copied out after the container stopped
        vol = tmp_path / "vol"
        vol.mkdir()
        r = run(eng.run_argv("evmm", "--name", "cp-me", "-v", f"{vol}:/data", IMAGE,
                             "sh", "-c", "echo volume > /data/v; echo payload > /result"))  # fmt: skip
        assert (vol / "v").read_text() == "volume\n"
        eng.cli("cp", "cp-me:/result", str(tmp_path / "result"))
        assert (tmp_path / "result").read_text() == "payload\n"


@pytest.mark.engines
@pytest.mark.cost(900)
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_memory_limit_sizes_the_guest(name: str) -> None:
    if (why := evmm_oci_missing()) is not None:
        pytest.skip(why)
    with engine(name) as eng:
        options = ("--memory-limit", str(256 << 20)) if isinstance(eng, Containerd) else ("--memory", "256m")
        r = run(run_argv(eng, "evmm", "mem", "sh", "-c", "head -1 /proc/meminfo", options=options))
        total_kib = int(r.stdout.split()[1])
        # The guest is the limit plus 64 MiB for its kernel (evmm/oci/spec.py); MemTotal is that less what
        # the kernel reserved at boot.
        assert 256 << 10 <= total_kib <= (256 + 64) << 10, r.stdout


@pytest.mark.engines
@pytest.mark.cost(900)
@pytest.mark.parametrize("name", DOCKERLIKE)
def test_port_publishing_reaches_the_vm(name: str) -> None:
    if (why := evmm_oci_missing()) is not None:
        pytest.skip(why)
    with engine(name) as eng:
        port = 18080
        detached(eng, "-p", f"127.0.0.1:{port}:80", IMAGE, "sh", "-c",
                 "while :; do echo hello-from-the-vm | nc -l -p 80; done")  # fmt: skip

        def answered() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    return b"hello-from-the-vm" in s.recv(100)
            except OSError:
                return False

        wait_for(answered, f"an answer on 127.0.0.1:{port}")


@pytest.mark.engines
@pytest.mark.cost(1800)
@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_ten_containers_at_once(name: str) -> None:
    if (why := evmm_oci_missing()) is not None:
        pytest.skip(why)
    with engine(name) as eng:
        memory = ("--memory-limit", str(64 << 20)) if isinstance(eng, Containerd) else ("--memory", "64m")
        procs = [
            subprocess.Popen(
                run_argv(eng, "evmm", f"ten{i}", "sh", "-c", f"echo ready-{i}; exit {i}", options=memory),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(10)
        ]
        results = [(p.communicate(timeout=BOOT * 3), p.returncode) for p in procs]
        for i, ((out, err), code) in enumerate(results):
            assert (code, out.strip()) == (i, f"ready-{i}"), err


@pytest.mark.engines
@pytest.mark.cost(900)
@pytest.mark.parametrize("name", DOCKERLIKE)
def test_interactive_terminal_in_tmux(name: str) -> None:
    if (why := evmm_oci_missing()) is not None:
        pytest.skip(why)
    with engine(name) as eng:
        session = f"oci-{name}-{os.getpid()}"
        argv = shlex.join(eng.run_argv("evmm", "-it", "--rm", IMAGE, "sh"))
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", argv], check=True)
        try:

            def screen() -> str:
                return subprocess.run(
                    ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=False
                ).stdout

            def keys(*k: str) -> None:
                subprocess.run(["tmux", "send-keys", "-t", session, *k], check=True)

            wait_for(lambda: "/ #" in screen(), "the container shell's prompt")
            keys("stty size", "Enter")
            wait_for(lambda: "24 80" in screen(), "stty size 24 80", 60)
            subprocess.run(["tmux", "resize-window", "-t", session, "-x", "100", "-y", "30"], check=True)
            keys("clear; stty size", "Enter")
            wait_for(lambda: "30 100" in screen(), "stty size after the resize", 60)
            keys("clear; sleep 1000", "Enter")
            time.sleep(3)
            keys("C-c")
            keys("echo interrupted-$?", "Enter")
            wait_for(lambda: "interrupted-130" in screen(), "Ctrl-C ending sleep", 60)
            keys("exit", "Enter")
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
