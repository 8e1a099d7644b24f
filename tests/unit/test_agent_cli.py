"""``evmm exec`` and ``evmm cp`` as a person runs them, without a VM: a fake ``evmm run`` (tests/fakes/agent.py)
serves the control socket and puts the real evmm-agent (ASan/UBSan build, on this host) behind its hybrid
vsock socket, so the commands find the agent through query-vm and the CONNECT handshake as they would in a
VM, and the "guest" is this host.  Terminals and a real guest: tests/linux/test_agent_cli.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.agent import HostAgent

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds evmm-agent")


@pytest.fixture(scope="module")
def vm() -> Iterator[Path]:
    """A fake VM's control socket, with a real agent behind its vsock socket."""
    with HostAgent() as agent, tempfile.TemporaryDirectory(prefix="evmm-cli-", dir="/tmp") as d:
        api = Path(d) / "api.sock"
        env = {**os.environ, "FAKE_VMM_AGENT": str(agent.path)}
        argv = [
            sys.executable,
            "-m",
            "tests.fakes.agent",
            "run",
            "--api-sock",
            str(api),
            "--vsock",
            f"cid=3,path={d}/v.sock",
        ]
        fake = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
        while not api.exists():
            assert fake.poll() is None, "the fake evmm run died"
            time.sleep(0.05)
        yield api
        fake.kill()
        fake.wait()


def evmm(
    *args: str, stdin: bytes | int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "evmm", *args],
        input=stdin if isinstance(stdin, bytes) else None,
        stdin=stdin if isinstance(stdin, int) else (None if isinstance(stdin, bytes) else subprocess.DEVNULL),
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_exec_passes_output_and_the_exit_code_through(vm: Path) -> None:
    r = evmm("exec", str(vm), "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = evmm("exec", str(vm), "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM


def test_exec_env_cwd_and_user(vm: Path, tmp_path: Path) -> None:
    user = f"{os.getuid()}:{os.getgid()}"
    script = ("sh", "-c", "echo $A $B; pwd; id -u")
    want = ["1", "two", str(tmp_path), str(os.getuid())]
    # Options before SOCK, as docker exec takes them, or after it, as the usage line shows them.
    r = evmm(
        "exec", "--env", "A=1", "-e", "B=two", "--cwd", str(tmp_path), "--user", user, str(vm), "--", *script
    )
    assert r.stdout.decode().split() == want
    r = evmm("exec", "-e", "A=1", str(vm), "--env", "B=two", "-w", str(tmp_path), "-u", user, "--", *script)
    assert r.stdout.decode().split() == want


def test_exec_i_passes_stdin_from_a_pipe_and_from_a_file(vm: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    r = evmm("exec", "-i", str(vm), "--", "sha256sum", stdin=data)
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    (tmp_path / "in").write_bytes(b"from a file\n")
    with (tmp_path / "in").open("rb") as f:
        r = evmm("exec", "-i", str(vm), "--", "cat", stdin=f.fileno())
    assert r.stdout == b"from a file\n"


def test_exec_t_without_a_terminal_here_gives_the_default_size(vm: Path) -> None:
    r = evmm("exec", "-t", str(vm), "--", "sh", "-c", "stty size; tty")
    assert r.returncode == 0 and r.stdout.startswith(b"24 80\r\n/dev/pts/")


def test_a_signal_to_evmm_exec_reaches_the_process(vm: Path) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "evmm",
            "exec",
            str(vm),
            "--",
            "sh",
            "-c",
            "trap 'echo caught; exit 9' INT; echo ready; while :; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    assert p.wait(30) == 9 and p.stdout.read() == b"caught\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["exec", "/nonexistent.sock", "--", "true"], "/nonexistent.sock: no control socket there"),
        (["exec", "VM", "--env", "NOVALUE", "--", "true"], "--env 'NOVALUE' is not NAME=VALUE"),
        (["exec", "VM"], "no command given"),
        (["exec", "VM", "--", "sh", "-c", "true", "--cwd"], None),
        (
            ["exec", "--cwd", "/nonexistent", "VM", "--", "true"],
            "exec true: chdir /nonexistent: No such file or directory",
        ),
        (["cp", "a", "b"], "exactly one of SRC and DST"),
        (["cp", "/nonexistent-src", "VM:/tmp/x"], "/nonexistent-src: no such file or directory"),
        (["cp", "VM:relative", "/tmp/x"], "the guest path must be absolute"),
        (["cp", "VM:/nonexistent-evmm", "/tmp/x"], "No such file or directory"),
    ],
)
def test_errors_are_one_line(vm: Path, args: list[str], message: str | None) -> None:
    r = evmm(*(str(vm) if a == "VM" else a.replace("VM:", f"{vm}:") for a in args))
    if message is None:  # not an error: "--cwd" after the command belongs to the command
        assert r.returncode == 0
        return
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("evmm: "), r.stderr
    assert message in lines[0]


def test_a_missing_program_is_127_with_a_message(vm: Path) -> None:
    r = evmm("exec", str(vm), "--", "evmm-no-such-program")
    assert (r.returncode, r.stderr) == (127, b"evmm-no-such-program: command not found\n")


def test_cp_files_and_directories_both_ways(vm: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a").write_bytes(os.urandom(600_000))
    (src / "sub" / "b").write_bytes(b"bee")
    (src / "sub" / "b").chmod(0o700)
    guest = tmp_path / "guest"  # "in the guest": the agent runs on this host
    guest.mkdir()
    assert evmm("cp", str(src / "a"), f"{vm}:{guest}/one").returncode == 0
    assert (guest / "one").read_bytes() == (src / "a").read_bytes()
    assert evmm("cp", str(src), f"{vm}:{guest}").returncode == 0  # into the existing directory
    assert (guest / "src" / "sub" / "b").read_bytes() == b"bee"
    assert (guest / "src" / "sub" / "b").stat().st_mode & 0o777 == 0o700
    back = tmp_path / "back"
    assert evmm("cp", f"{vm}:{guest}/src", str(back)).returncode == 0
    assert (back / "a").read_bytes() == (src / "a").read_bytes()
    assert (back / "sub" / "b").stat().st_mode & 0o777 == 0o700
    assert evmm("cp", f"{vm}:{guest}/one", str(tmp_path)).returncode == 0  # into a host directory
    assert (tmp_path / "one").read_bytes() == (src / "a").read_bytes()
