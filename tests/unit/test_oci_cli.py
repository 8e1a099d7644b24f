"""evmm-oci's command line and process model, end to end, against the fake guest (tests/fakes/oci_guest.py).

Each test drives ``python -m evmm.oci`` as an engine does (create, start, kill, state, delete, exec ...) and,
like containerd's shim or conmon, is a subreaper: the container monitor (the pid in --pid-file) outlives
``create`` and is reparented to the test, which waits on it for the container's exit status.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evmm.oci.console import receive_master, set_window_size
from evmm.oci.state import start_time

REPO = Path(__file__).resolve().parents[2]
PR_SET_CHILD_SUBREAPER = 36

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the monitor makes a network namespace: needs root")


def config(args: list[str], *, terminal: bool = False, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": args, "cwd": "/", "env": ["PATH=/usr/bin:/bin"], "terminal": terminal},
        "hostname": "box",
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "mount", "ipc", "uts")]},
    }
    c.update(extra)
    return c


class Runtime:
    """``evmm-oci`` with a state root and a json log of its own, over the fake guest."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "state"
        self.log = tmp / "log.json"
        self.env = {
            **os.environ,
            "EVMM_OCI_GUEST": "tests.fakes.oci_guest:FakeGuestFactory",
            "PYTHONPATH": str(REPO),
        }

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "evmm.oci", "--root", str(self.root), "--log", str(self.log),
                "--log-format", "json", *args]  # fmt: skip

    def run(self, *args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run evmm-oci; its output is caught in files, not pipes: a container monitor (create) keeps the
        caller's stdout and stderr as the container's, so a pipe would not end before the container does."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            kw.setdefault("stdout", out)
            kw.setdefault("stderr", err)
            kw.setdefault("env", self.env)
            proc = subprocess.run(self.argv(*args), text=True, cwd=REPO, timeout=60, check=False, **kw)
            out.seek(0)
            err.seek(0)
            r = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
        if check and r.returncode != 0:
            raise AssertionError(f"evmm-oci {' '.join(args)} -> {r.returncode}: {r.stderr}")
        return r

    def bundle(self, name: str, cfg: dict[str, Any]) -> Path:
        b = self.tmp / name
        (b / "rootfs").mkdir(parents=True)
        (b / "config.json").write_text(json.dumps(cfg))
        return b

    def create(self, cid: str, cfg: dict[str, Any], **kw: Any) -> int:
        b = self.bundle(cid, cfg)
        pid_file = self.tmp / f"{cid}.pid"
        self.run("create", "--bundle", str(b), "--pid-file", str(pid_file), cid, **kw)
        return int(pid_file.read_text())

    def state(self, cid: str) -> dict[str, Any]:
        return json.loads(self.run("state", cid).stdout)  # type: ignore[no-any-return]

    def last_error(self) -> str:
        errors = [json.loads(ln) for ln in self.log.read_text().splitlines()]
        return str([e for e in errors if e["level"] == "error"][-1]["msg"])


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    runtime = Runtime(tmp_path)
    try:
        yield runtime
    finally:
        for cid in (p.name for p in runtime.root.glob("*")):
            runtime.run("delete", "--force", cid, check=False)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        _reap()


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait(pid: int, timeout: float = 20.0) -> int:
    """The monitor's wait status, as the engine (its subreaper) sees it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    raise AssertionError(f"monitor {pid} still running after {timeout} s")


def test_create_start_and_the_exit_code(rt: Runtime) -> None:
    pid = rt.create("c1", config(["sh", "-c", "exit 3"]))
    st = rt.state("c1")
    assert (st["status"], st["pid"], st["id"]) == ("created", pid, "c1")
    assert st["bundle"] == str(rt.tmp / "c1") and st["ociVersion"].startswith("1.")
    rt.run("start", "c1")
    status = wait(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert rt.state("c1")["status"] == "stopped"
    err = rt.run("start", "c1", check=False)
    assert err.returncode == 1 and "cannot start a container that has stopped" in err.stderr
    rt.run("delete", "c1")
    assert not (rt.root / "c1").exists()
    gone = rt.run("state", "c1", check=False)
    assert gone.returncode == 1 and 'container "c1" does not exist' in gone.stderr


def test_signal_death_is_passed_on(rt: Runtime) -> None:
    pid = rt.create("c2", config(["sh", "-c", "kill -USR1 $$; sleep 5"]))
    rt.run("start", "c2")
    status = wait(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1


def test_kill_forwards_and_the_monitor_dies_of_it(rt: Runtime) -> None:
    pid = rt.create("c3", config(["sleep", "100"]))
    rt.run("start", "c3")
    assert rt.state("c3")["status"] == "running"
    rt.run("kill", "c3", "TERM")
    status = wait(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_signal_sent_to_the_monitor_reaches_the_process(rt: Runtime) -> None:
    pid = rt.create("c4", config(["sh", "-c", "trap 'exit 42' HUP; while :; do sleep 0.1; done"]))
    rt.run("start", "c4")
    time.sleep(0.5)  # the trap is set
    os.kill(pid, signal.SIGHUP)
    status = wait(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 42


SCRIPT = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"


def test_stdout_and_stderr_order_through_the_callers_pipe(rt: Runtime) -> None:
    """One pipe for both (2>&1): the process's writes keep their order, as they would under runc."""
    script = SCRIPT
    r, w = os.pipe()
    try:
        pid = rt.create("c5", config(["sh", "-c", script]), stdout=w, stderr=w)
    finally:
        os.close(w)
    rt.run("start", "c5")
    assert os.WEXITSTATUS(wait(pid)) == 0
    with os.fdopen(r) as f:
        lines = f.read().split()
    assert lines == [f"{s}{i}" for i in range(1, 6) for s in ("out", "err")]


def test_stdout_and_stderr_through_their_own_pipes(rt: Runtime) -> None:
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    try:
        pid = rt.create("c5b", config(["sh", "-c", SCRIPT]), stdout=w1, stderr=w2)
    finally:
        os.close(w1)
        os.close(w2)
    rt.run("start", "c5b")
    assert os.WEXITSTATUS(wait(pid)) == 0
    with os.fdopen(r1) as out, os.fdopen(r2) as err:
        assert (out.read().split(), err.read().split()) == (
            [f"out{i}" for i in range(1, 6)],
            [f"err{i}" for i in range(1, 6)],
        )


def test_stdin_is_relayed_and_closed(rt: Runtime) -> None:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    pid = rt.create("c6", config(["sh", "-c", "tr a-z A-Z; echo done"]), stdin=r_in, stdout=w_out)
    os.close(r_in)
    os.close(w_out)
    rt.run("start", "c6")
    os.write(w_in, b"hello\n")
    os.close(w_in)
    assert os.WEXITSTATUS(wait(pid)) == 0
    with os.fdopen(r_out) as f:
        assert f.read() == "HELLO\ndone\n"


def test_terminal_over_the_console_socket_with_a_resize(rt: Runtime) -> None:
    path = rt.tmp / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    cfg = config(["sh", "-c", "read x; stty size; exit 7"], terminal=True)
    b = rt.bundle("c7", cfg)
    pid_file = rt.tmp / "c7.pid"
    proc = subprocess.Popen(
        rt.argv(
            "create", "--bundle", str(b), "--console-socket", str(path), "--pid-file", str(pid_file), "c7"
        ),
        env=rt.env,
        cwd=REPO,
    )
    conn, _ = listener.accept()
    master = receive_master(conn)
    assert proc.wait(30) == 0
    pid = int(pid_file.read_text())
    set_window_size(master, 33, 77)
    rt.run("start", "c7")
    time.sleep(0.5)
    set_window_size(master, 41, 99)  # after the start: passed on as a resize (SIGWINCH on the monitor)
    time.sleep(0.5)
    os.write(master, b"go\n")
    status = wait(pid)
    out = b""
    os.set_blocking(master, False)
    try:
        while chunk := os.read(master, 4096):
            out += chunk
    except OSError:
        pass
    assert b"41 99" in out, out
    assert os.WEXITSTATUS(status) == 7


def test_delete_refuses_a_running_container_and_force_leaves_nothing(rt: Runtime) -> None:
    pid = rt.create("c8", config(["sleep", "100"]))
    rt.run("start", "c8")
    vmm = json.loads((rt.root / "c8" / "state.json").read_text())["vmm_pid"]
    r = rt.run("delete", "c8", check=False)
    assert r.returncode == 1 and "cannot delete container c8 that is not stopped: running" in r.stderr
    assert "not stopped" in rt.last_error()
    rt.run("delete", "--force", "c8")
    assert os.WIFSIGNALED(wait(pid))
    assert not (rt.root / "c8").exists()
    for _ in range(100):  # the "VMM" dies with its monitor (PR_SET_PDEATHSIG)
        if start_time(vmm) is None:  # gone, or a zombie left for us (the subreaper) to reap
            break
        time.sleep(0.05)
    assert start_time(vmm) is None


def test_a_crashed_vm_stops_the_container_with_a_failure(rt: Runtime) -> None:
    pid = rt.create("c9", config(["sleep", "100"]))
    rt.run("start", "c9")
    vmm = json.loads((rt.root / "c9" / "state.json").read_text())["vmm_pid"]
    os.kill(vmm, signal.SIGKILL)
    status = wait(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 255
    assert rt.state("c9")["status"] == "stopped"
    assert "the VM stopped" in rt.last_error()


def test_exec_in_a_running_container(rt: Runtime) -> None:
    pid = rt.create("c10", config(["sleep", "100"]))
    rt.run("start", "c10")
    r = rt.run("exec", "c10", "sh", "-c", "echo from-exec; echo oops >&2; exit 4", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (4, "from-exec\n", "oops\n")
    process = rt.tmp / "process.json"
    process.write_text(json.dumps({"args": ["sh", "-c", "sleep 10; exit 5"], "cwd": "/", "env": []}))
    pid_file = rt.tmp / "exec.pid"
    rt.run("exec", "--process", str(process), "--detach", "--pid-file", str(pid_file), "c10")
    exec_pid = int(pid_file.read_text())
    pids = json.loads(rt.run("ps", "--format", "json", "c10").stdout)
    assert pid in pids and exec_pid in pids
    assert os.WEXITSTATUS(wait(exec_pid, 60)) == 5
    rt.run("kill", "c10", "KILL")
    assert os.WTERMSIG(wait(pid)) == signal.SIGKILL


def test_pause_and_resume(rt: Runtime) -> None:
    pid = rt.create("c11", config(["sleep", "100"]))
    rt.run("start", "c11")
    rt.run("pause", "c11")
    assert rt.state("c11")["status"] == "paused"
    rt.run("resume", "c11")
    assert rt.state("c11")["status"] == "running"
    rt.run("kill", "c11", "9")
    assert os.WTERMSIG(wait(pid)) == signal.SIGKILL


def test_killing_a_created_container_stops_it(rt: Runtime) -> None:
    pid = rt.create("c12", config(["sleep", "100"]))
    rt.run("kill", "c12", "SIGKILL")
    assert os.WTERMSIG(wait(pid)) == signal.SIGKILL
    assert rt.state("c12")["status"] == "stopped"


def test_errors_are_one_line_in_the_json_log(rt: Runtime) -> None:
    cfg = config(["true"], linux={"namespaces": [{"type": "network"}, {"type": "user"}], "uidMappings": [{}]})
    b = rt.bundle("bad", cfg)
    r = rt.run("create", "--bundle", str(b), "bad", check=False)
    assert r.returncode == 1
    msg = rt.last_error()
    assert "linux.uidMappings" in msg and "linux.namespaces[user]" in msg
    assert r.stderr.strip() == msg and "\n" not in msg
    assert not (rt.root / "bad").exists()
    good = rt.bundle("good", config(["true"]))
    r = rt.run("create", "--bundle", str(good), "../x", check=False)
    assert r.returncode == 1 and "invalid id format: ../x" in r.stderr


def test_a_failed_boot_leaves_no_state(rt: Runtime) -> None:
    b = rt.bundle("c13", config(["true"]))
    r = rt.run(
        "create", "--bundle", str(b), "c13", check=False, env={**rt.env, "FAKE_OCI_BOOT_FAIL": "no kernel"}
    )
    assert r.returncode == 1 and "no kernel" in r.stderr
    assert not (rt.root / "c13").exists()


def test_the_id_must_be_new(rt: Runtime) -> None:
    rt.create("c14", config(["sleep", "100"]))
    b = rt.bundle("c14b", config(["true"]))
    r = rt.run("create", "--bundle", str(b), "c14", check=False)
    assert r.returncode == 1 and "container with id exists: c14" in r.stderr


def test_a_state_root_deeper_than_a_socket_path_holds(tmp_path: Path) -> None:
    """docker's --root for a runtime is deep: ROOT/ID/monitor.sock runs past sockaddr_un's 107 bytes."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        rt = Runtime(tmp_path)
        rt.root = tmp_path / "runtime-evmm" / ("m" * 40) / "moby"
        cid = "f" * 64
        assert len(str(rt.root / cid / "monitor.sock")) > 108
        pid = rt.create(cid, config(["sh", "-c", "exit 6"]))
        rt.run("start", cid)
        assert os.WEXITSTATUS(wait(pid)) == 6
        rt.run("delete", cid)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        _reap()
