"""``evmm console`` as a person uses it (issue 5, "Done means"), driven in tmux with send-keys/capture-pane:
reach the guest's shell prompt, run a command, detach with Ctrl-] d (the VM keeps running), reattach, and
quit the VM from the menu; the terminal's settings are the same afterwards.  And `evmm run --virtio-console stdio`
in a terminal: the window's size reaches the guest's hvc0 as it changes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.exitcodes import EXIT_GUEST_POWEROFF
from tests.conftest import GuestFactory
from tests.linux.harness import PROMPT, READY, evmm_run_argv, kernel_args
from tests.linux.test_control import wait_for_socket

BOOT_TIMEOUT = 120.0
PANE_PROMPT = re.compile(r"evmm:[^\n]*#")  # capture-pane drops the prompt's trailing space


class Tmux:
    """A private tmux server (its own socket), one window per command, read back with capture-pane."""

    def __init__(self, workdir: Path) -> None:
        self.socket = f"evmm-test-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.started = False

    def tmux(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout

    def start(self, name: str, command: str) -> None:
        """Run ``command`` in a new window; the window outlives it (sleep) so that its last words can be read."""
        wrapped = f"sh -c {shlex.quote(command + '; sleep 600')}"
        if not self.started:
            self.tmux("new-session", "-d", "-s", "evmm", "-x", "120", "-y", "40", "-n", name, wrapped)
            self.started = True
        else:
            self.tmux("new-window", "-d", "-t", "evmm", "-n", name, wrapped)

    def keys(self, name: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", f"evmm:{name}", *keys)

    def screen(self, name: str) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-500", "-t", f"evmm:{name}")

    def wait(self, name: str, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(name)
            m = regex.search(text)
            if m is not None:
                return m
            if time.monotonic() > deadline:
                tail = "\n".join(f"  | {ln}" for ln in text.rstrip().splitlines()[-25:])
                raise AssertionError(
                    f"no {regex.pattern!r} on tmux window {name} within {timeout:g} s\n{tail}"
                )
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    with tempfile.TemporaryDirectory(prefix="evmm-con-", dir="/tmp") as d:
        t = Tmux(Path(d))
        try:
            yield t
        finally:
            t.close()


def console_command(sock: Path, workdir: Path, name: str) -> str:
    """``evmm console`` wrapped to record the terminal's settings before and after, and the exit status."""
    before, after = workdir / f"{name}.before", workdir / f"{name}.after"
    evmm = f"{shlex.quote(sys.executable)} -m evmm console {shlex.quote(str(sock))}"
    return f"stty -g > {before}; {evmm}; echo evmm-console-exit=$?; stty -g > {after}"


def same_terminal(workdir: Path, name: str) -> None:
    before, after = workdir / f"{name}.before", workdir / f"{name}.after"
    for _ in range(50):
        if after.exists() and after.read_text():
            break
        time.sleep(0.1)
    assert before.read_text() == after.read_text(), "evmm console left the terminal changed"


def test_console_in_tmux_prompt_command_detach_reattach_quit(
    launch: GuestFactory, guest_assets: GuestAssets, tmux: Tmux
) -> None:
    sock = tmux.workdir / "api.sock"
    argv = [*evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs), "--api-sock", str(sock)]
    guest = launch(argv, "evmm-console")
    wait_for_socket(sock)
    guest.expect(READY, BOOT_TIMEOUT)
    guest.expect(PROMPT, 30)

    tmux.start("first", console_command(sock, tmux.workdir, "first"))
    tmux.wait("first", r"Ctrl-\] for the menu")
    tmux.keys("first", "Enter")
    tmux.wait("first", PANE_PROMPT)
    tmux.keys("first", "echo typed-in-tmux-$((6 * 7))", "Enter")
    tmux.wait("first", r"typed-in-tmux-42")
    tmux.keys("first", "C-]")
    tmux.wait("first", r"evmm\s+running . 1 vCPU . up \d+:\d\d:\d\d . p pause")
    tmux.keys("first", "d")
    tmux.wait("first", r"detached; the VM keeps running")
    tmux.wait("first", r"evmm-console-exit=0")
    same_terminal(tmux.workdir, "first")

    # Detached: the VM runs on (its own console still answers), and a second attach sees where it was.
    assert guest.check("echo still-running").strip() == "still-running"
    tmux.start("second", console_command(sock, tmux.workdir, "second"))
    tmux.wait("second", r"typed-in-tmux-42")  # the replay of recent output
    tmux.keys("second", "uname -s", "Enter")
    tmux.wait("second", r"\nLinux")
    tmux.keys("second", "C-]", "p")
    tmux.wait("second", r"paused in [\d.]+ ms")
    tmux.keys("second", "C-]", "r")
    tmux.wait("second", r"running in [\d.]+ ms")
    tmux.keys("second", "C-]", "q")
    tmux.wait("second", r"the VM stopped: quit by control client")
    tmux.wait("second", r"evmm-console-exit=0")
    assert guest.wait_exit(60) == EXIT_GUEST_POWEROFF
    same_terminal(tmux.workdir, "second")


def pane_size(tmux: Tmux, name: str) -> str:
    """``rows cols`` of a tmux window's pane, as ``stty size`` prints them."""
    return tmux.tmux("display-message", "-p", "-t", f"evmm:{name}", "#{pane_height} #{pane_width}").strip()


def test_hvc0_follows_the_terminal_window(guest_assets: GuestAssets, tmux: Tmux) -> None:
    """``evmm run --virtio-console stdio`` in a terminal: a window resize reaches the guest's hvc0 (F_SIZE)."""
    append = kernel_args().replace("console=ttyS0", "console=hvc0")
    argv = [
        *evmm_run_argv(guest_assets.vmlinux, guest_assets.initramfs, append=append),
        "--virtio-console",
        "stdio",
    ]
    tmux.start("hvc", f"{shlex.join(argv)}; echo evmm-exit=$?")
    tmux.wait("hvc", PANE_PROMPT, BOOT_TIMEOUT)
    for cols, rows in ((100, 30), (140, 45)):
        tmux.tmux("resize-window", "-t", "evmm:hvc", "-x", str(cols), "-y", str(rows))
        want = pane_size(tmux, "hvc")
        # Each round prints a fresh marker, so an old answer on the screen cannot match.
        tmux.keys("hvc", f"echo size-{cols}=$(stty size)", "Enter")
        tmux.wait("hvc", rf"size-{cols}={want}\b")
    tmux.keys("hvc", "poweroff", "Enter")
    tmux.wait("hvc", rf"evmm-exit={EXIT_GUEST_POWEROFF}\b")
