"""``evmm exec`` and ``evmm cp`` against a guest booted by ``evmm run --api-sock --vsock``, and the README's
Sandbox example run as written.

``evmm exec -it`` in tmux (as tests/linux/test_console.py drives ``evmm console``): the shell's prompt, ``stty
size`` following window resizes, Ctrl-C interrupting a command in the guest, the exit status passed through
and the terminal's settings the same afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.sandbox import AgentClient
from tests.linux.harness import READY, Guest, evmm_run_argv
from tests.linux.test_console import Tmux, pane_size, same_terminal, tmux  # noqa: F401 - the tmux fixture
from tests.linux.test_control import wait_for_socket

BOOT_TIMEOUT = 180.0
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def vm(
    guest_assets: GuestAssets, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """A guest with a control socket and a hybrid vsock device, its agent answering; yields the socket."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="evmm-ex-", dir="/tmp"))
    api = d / "api.sock"
    argv = [
        *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs),
        "--api-sock",
        str(api),
        "--vsock",
        f"cid=3,path={d}/v.sock",
    ]
    guest = Guest(argv, "evmm-exec")
    request.node.evmm_guests = [guest]
    try:
        wait_for_socket(api)
        guest.expect(READY, BOOT_TIMEOUT)

        async def agent_up() -> None:
            client = await AgentClient.connect_when_ready(d / "v.sock", timeout=60)
            await client.close()

        asyncio.run(agent_up())
        yield api
    finally:
        guest.close()


def evmm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "evmm", *args], input=stdin, capture_output=True, timeout=300, check=False
    )


def test_exec_it_in_tmux_prompt_resize_ctrl_c_and_exit_status(vm: Path, tmux: Tmux) -> None:  # noqa: F811
    before, after = tmux.workdir / "exec.before", tmux.workdir / "exec.after"
    evmm_exec = (
        f"{shlex.quote(sys.executable)} -m evmm exec -it --env 'PS1=agent-sh# ' {shlex.quote(str(vm))} -- sh"
    )
    tmux.start("exec", f"stty -g > {before}; {evmm_exec}; echo evmm-exec-exit=$?; stty -g > {after}")
    tmux.wait("exec", r"agent-sh#", 120)
    for cols, rows in ((120, 40), (100, 30), (140, 45)):
        if (cols, rows) != (120, 40):
            tmux.tmux("resize-window", "-t", "evmm:exec", "-x", str(cols), "-y", str(rows))
        want = pane_size(tmux, "exec")
        tmux.keys("exec", f"echo size-{cols}=$(stty size)", "Enter")
        tmux.wait("exec", rf"size-{cols}={want}\b")
    tmux.keys("exec", "echo sleeping; sleep 1000", "Enter")
    tmux.wait("exec", r"\nsleeping")
    time.sleep(1)  # sleep(1) has started by now
    tmux.keys("exec", "C-c")
    tmux.keys("exec", "echo sleep-status=$?", "Enter")
    tmux.wait("exec", r"sleep-status=130")  # SIGINT, from the guest's terminal, ended it
    tmux.keys("exec", "echo after-$((6 * 7))", "Enter")
    tmux.wait("exec", r"after-42")
    tmux.keys("exec", "exit 5", "Enter")
    tmux.wait("exec", r"evmm-exec-exit=5")
    same_terminal(tmux.workdir, "exec")


def test_exec_pipes_and_cp_both_ways(vm: Path, tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    r = evmm("exec", "-i", str(vm), "--", "sha256sum", stdin=data)
    assert r.returncode == 0 and r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = evmm("exec", str(vm), "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 42")
    assert (r.returncode, r.stdout, r.stderr) == (42, b"to-out\n", b"to-err\n")
    (tmp_path / "up").write_bytes(data)
    (tmp_path / "up").chmod(0o751)
    assert evmm("cp", str(tmp_path / "up"), f"{vm}:/tmp/in-guest").returncode == 0
    r = evmm("exec", str(vm), "--", "sh", "-c", "stat -c %a /tmp/in-guest; sha256sum /tmp/in-guest")
    assert r.stdout.split()[:2] == [b"751", hashlib.sha256(data).hexdigest().encode()]
    r = evmm("cp", f"{vm}:/tmp/in-guest", str(tmp_path / "down"))
    assert r.returncode == 0 and (tmp_path / "down").read_bytes() == data
    r = evmm("cp", f"{vm}:/nonexistent", str(tmp_path / "x"))
    assert (
        r.returncode == 1 and r.stderr.decode().startswith("evmm: ") and "No such file" in r.stderr.decode()
    )


def readme_example() -> str:
    """The README's Sandbox example: the python block of its "Running programs in a guest" section."""
    text = README.read_text()
    section = text[text.index("## Running programs in a guest") :]
    m = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert m is not None, "no python block in the README's section"
    return m.group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_example()
    assert len(code.strip().splitlines()) == 5
    script = tmp_path / "example.py"
    script.write_text(code)
    # This checkout's evmm, whatever evmm the Python has installed.
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=False, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "exit_code=3" in r.stdout and "stdout=b'hi\\n'" in r.stdout, r.stdout
