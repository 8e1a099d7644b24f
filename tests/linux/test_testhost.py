"""The KVM test host itself: exit status, streaming, shares, its KVM, and failing (not hanging) on broken boots.

Tests marked ``host_side`` run on the host and boot the test host themselves (a few seconds each); the rest
run inside it with the rest of the linux tier.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from evmm.assets import GuestAssets
from evmm.hostkvm import probe
from evmm.testhost.runner import EXIT_TIMEOUT
from tests.conftest import GuestFactory
from tests.linux.harness import READY, GuestError, evmm_run_argv

host_side = pytest.mark.host_side
BOOT_SLACK = 90.0  # generous: two cores shared with everything else on the machine


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN instead of
    # installing its KeyboardInterrupt handler: the runner must see Ctrl-C as a user's terminal sends it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_testhost(*args: str, cwd: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "evmm.testhost", "run", *args]
    return subprocess.Popen(
        argv,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def corrupt(bzimage: bytes) -> bytes:
    """The image with 4 KiB of its compressed payload zeroed (the setup header stays valid)."""
    image = bytearray(bzimage)
    middle = len(image) // 2
    image[middle : middle + 4096] = bytes(4096)
    return bytes(image)


@pytest.fixture(scope="module")
def testhost_images() -> None:
    from evmm.testhost.assets import build_testhost_assets

    build_testhost_assets()


@host_side
def test_status_streaming_and_shares(testhost_images: None, tmp_path: Path) -> None:
    """One boot: output arrives while the command runs, a share carries files both ways, the status returns."""
    (tmp_path / "from-host").write_text("hello from the host\n")
    script = (
        "echo written-inside > from-inside; "
        "echo first; cat from-host; cat /sys/module/kvm_amd/parameters/npt; "
        "i=0; while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
        "echo second; echo to-stderr >&2; exit 7"
    )
    proc = start_testhost("--share", str(tmp_path), "--", "sh", "-c", script, cwd=tmp_path)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    # Streaming: "first" is here while the command is still waiting for us.
    assert first == "first\n"
    assert proc.poll() is None
    assert proc.stdout.readline() == "hello from the host\n"
    assert proc.stdout.readline() == "Y\n"  # kvm_amd loaded with nested paging
    assert (tmp_path / "from-inside").read_text() == "written-inside\n"
    (tmp_path / "go").write_text("")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 7
    assert out == "second\nto-stderr\n"  # stdout and stderr share the command's terminal
    assert "testhost:" not in err


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {needle!r} within {timeout:g} s; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the pty's last user closed it
                chunk = b""
            assert chunk, f"EOF before {needle!r}; got {seen!r}"
            seen += chunk
    return seen


@host_side
def test_interactive_command_gets_a_terminal_and_ours_is_restored(
    testhost_images: None, tmp_path: Path
) -> None:
    """On a terminal: the command's stdin is the test host's console (a tty), and our terminal comes back sane."""
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    script = "tty; echo waiting-for-input; read line; echo got:$line; exit 4"
    argv = [sys.executable, "-m", "evmm.testhost", "run", "--", "sh", "-c", script]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    try:
        out = _read_until(master, b"waiting-for-input", 120)
        assert b"/dev/ttyS0" in out
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # ours is raw while the command runs
        os.write(master, b"hello\r")  # a person presses Enter: CR, which the test host's tty turns into NL
        out += _read_until(master, b"got:hello", 120)
        assert proc.wait(60) == 4
    finally:
        proc.kill()
        proc.wait()
    assert termios.tcgetattr(slave) == before
    os.close(slave)
    os.close(master)


def _child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"  # a zombie runs nothing
    except OSError:
        return True


@host_side
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_no_qemu_outlives_the_runner(testhost_images: None, tmp_path: Path, signum: int) -> None:
    """SIGTERM/SIGINT: the runner kills QEMU and exits 128+N; SIGKILL: PR_SET_PDEATHSIG takes QEMU with it."""
    proc = start_testhost("--", "sleep", "600", cwd=tmp_path)
    deadline = time.monotonic() + 30
    # The child is the runner's own Python between fork and exec for a moment: wait for QEMU itself.
    while not (qemus := [c for c in _child_pids(proc.pid) if _comm(c).startswith("qemu-system")]):
        assert time.monotonic() < deadline and proc.poll() is None, "QEMU never started"
        time.sleep(0.05)
    qemu = qemus[0]
    proc.send_signal(signum)
    status = proc.wait(30)
    assert status == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signum)
    deadline = time.monotonic() + 10
    while not _gone(qemu):
        assert time.monotonic() < deadline, f"QEMU (pid {qemu}) outlived the runner"
        time.sleep(0.05)


@host_side
def test_hung_command_is_killed_and_reported(testhost_images: None, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = start_testhost("--timeout", "5", "--", "sleep", "600", cwd=tmp_path)
    _, err = proc.communicate(timeout=5 + BOOT_SLACK)
    assert proc.returncode == EXIT_TIMEOUT
    assert "testhost: the command timed out after 5 s" in err
    assert time.monotonic() - started < 5 + BOOT_SLACK
    # Before the kill, QEMU's monitor said where each of L1's vCPUs was (64-bit: the kernel is running).
    vcpus = err[err.index("--- test host vCPUs before it was killed ---") :]
    assert "CPU #0:" in vcpus and "CPU #1:" in vcpus
    assert len(re.findall(r"RIP=[0-9a-f]{16} RFL=", vcpus)) == 2, vcpus


@host_side
def test_corrupt_testhost_kernel_fails_within_the_boot_timeout(
    testhost_images: None, guest_assets: GuestAssets, tmp_path: Path
) -> None:
    """A test host whose kernel never boots is killed and reported at its boot timeout, not waited on forever.

    The kernel is a real bzImage with its compressed payload damaged: QEMU loads it, its decompressor finds
    the data corrupt and halts the CPU, which is a hang as far as the host can tell.
    """
    from evmm.testhost.assets import testhost_assets
    from evmm.testhost.runner import EXIT_NO_STATUS, RunConfig, run

    broken = tmp_path / "vmlinuz-corrupt"
    broken.write_bytes(corrupt(guest_assets.bzimage.read_bytes()))
    config = RunConfig(
        command=["true"], kernel=broken, initramfs=testhost_assets().initramfs, boot_timeout=15, cwd=tmp_path
    )
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    status = run(config, out_fd=write_fd, err_fd=write_fd, stdin_fd=0)
    elapsed = time.monotonic() - started
    os.close(write_fd)
    with os.fdopen(read_fd) as r:
        report = r.read()
    assert status in (EXIT_TIMEOUT, EXIT_NO_STATUS), report
    assert (
        "testhost: boot timed out after 15 s" in report or "before the command's status came back" in report
    )
    assert elapsed < 15 + 30


def test_inside_the_kvm_is_kvm_amd() -> None:
    if os.environ.get("EVMM_IN_TESTHOST") != "1":
        pytest.skip("runs inside the KVM test host only (here the host's own KVM is used)")
    host = probe()
    assert host.present and host.module == "kvm_amd" and host.can_boot_linux, host.reason
    assert Path("/sys/module/kvm_amd/parameters/npt").read_text().strip() == "Y"


def test_a_corrupt_guest_kernel_fails_the_test_within_its_timeout(
    launch: GuestFactory, guest_assets: GuestAssets, tmp_path: Path
) -> None:
    """The linux tier's own failure path: a guest that never becomes ready makes the harness fail in time.

    The kernel is the real bzImage with its compressed payload damaged: it loads, then its decompressor
    finds the data corrupt and halts; nothing ever prints the ready line.
    """
    broken = tmp_path / "vmlinuz-corrupt"
    broken.write_bytes(corrupt(guest_assets.bzimage.read_bytes()))
    guest = launch(evmm_run_argv(broken, guest_assets.initramfs), "corrupt-kernel")
    started = time.monotonic()
    with pytest.raises(GuestError):
        guest.expect(READY, timeout=20)
    assert time.monotonic() - started < 20 + 5


@pytest.mark.slow  # 150 s of a third test host, beside the tier's two: run it when changing tests/tiers.py
@host_side
def test_the_tier_survives_lost_test_hosts(testhost_images: None) -> None:
    """The linux tier through two lost test hosts, end to end (tests/linux/tier_selftest/lossy.py).

    One test panics its test host's kernel, the next stops its inner run dead; each runs again in a fresh
    test host and passes there, and the test after them runs too: three boots, three passes, each loss
    reported with its reason, the silent one with where the test host's vCPUs were.
    """
    from tests.linux.tier_selftest.lossy import SELFTEST_ENV
    from tests.tiers import CPUS_ENV, REPORT_ENV, SHARDS_ENV, STALL_ENV

    if probe().can_boot_linux:
        pytest.skip("this host's KVM runs the linux tier directly: there is no test host to lose")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, SHARDS_ENV: "1", CPUS_ENV: "1", STALL_ENV: "60", SELFTEST_ENV: "1"}
    env.pop(REPORT_ENV, None)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA"]
    r = subprocess.run(
        [*argv, "tests/linux/tier_selftest/lossy.py"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout
    assert r.returncode == 0 and "3 passed" in out, out
    summary = next(line for line in out.splitlines() if "KVM test host boot(s)" in line)
    assert "3 tests in 3 KVM test host boot(s)" in summary, summary
    assert "boot 1: the test host exited 125" in summary and "test_a_test_host_that_dies ran" in summary
    assert "boot 2: the test host gave no sign of life (report or heartbeat) for 60 s" in summary
    assert "test_a_test_host_that_goes_silent ran" in summary
    # Each of the two passed in a fresh test host: the outer run says so.
    assert out.count("RerunWarning: rerun inside the KVM test host after: a fresh KVM test host ran it") == 2
    log = Path(re.findall(r"inner run's log: (\S+)", out)[0]).read_text(errors="replace")
    assert "--- test host vCPUs before it was killed ---" in log and "CPU #0:" in log
    assert "Kernel panic - not syncing: sysrq triggered crash" in log  # L1's console, for the lost boot
