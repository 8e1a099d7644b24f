"""The test host runner: environment, shares, the command script, QEMU's command line, its monitor."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from evmm.testhost.runner import (
    EXIT_NO_STATUS,
    WHERE_ARE_THE_VCPUS,
    RunConfig,
    Share,
    command_script,
    forwarded_env,
    monitor_query,
    qemu_argv,
    visible_shares,
)


def test_forwarded_environment() -> None:
    env = forwarded_env(
        {
            "PATH": "/bin",
            "HOME": "/root",
            "TERM": "xterm",
            "EVMM_CACHE": "/c",
            "PYTHONPATH": "/p",
            "SSH_AUTH_SOCK": "x",
        }
    )
    assert env == {
        "PATH": "/bin",
        "HOME": "/root",
        "TERM": "xterm",
        "EVMM_CACHE": "/c",
        "PYTHONPATH": "/p",
        "EVMM_IN_TESTHOST": "1",
    }


def test_paths_hidden_by_the_test_host_are_shared_read_only() -> None:
    explicit = [Share(Path("/tmp/pytest-of-root/run1"))]
    shares = visible_shares(
        explicit, [Path("/tmp/pytest-of-root/run1/sub"), Path("/tmp/ci/evmm"), Path("/work/main")]
    )
    # Covered by --share: nothing added; /tmp/ci/evmm would be hidden by the tmpfs: read-only share; /work: visible.
    assert shares == [*explicit, Share(Path("/tmp/ci/evmm"), writable=False)]


def test_command_script_quotes_and_runs(tmp_path: Path) -> None:
    odd = tmp_path / "dir with 'quotes' and $dollar"
    odd.mkdir()
    script = command_script(
        ["sh", "-c", 'echo "$X|$(pwd)"; exit 9'], odd, {"X": "a b;c", "EVMM_IN_TESTHOST": "1"}
    )
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert (r.stdout, r.returncode) == (f"a b;c|{odd}\n", 9)


def test_command_script_fails_clearly_without_its_directory(tmp_path: Path) -> None:
    script = command_script(["true"], tmp_path / "absent", {})
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert r.returncode == EXIT_NO_STATUS
    assert "cannot enter" in r.stderr and "--share" in r.stderr


def test_qemu_command_line() -> None:
    config = RunConfig(command=["true"], kernel=Path("/k"), initramfs=Path("/i"), memory_mib=1024, cpus=2)
    shares = [Share(Path("/tmp/a")), Share(Path("/tmp/b"), writable=False)]
    argv = qemu_argv(config, Path("/tmp/results"), shares)
    joined = " ".join(argv)
    assert "-cpu qemu64,+svm,+npt,+vgif" in joined and "-m 1024M" in joined and "-smp 2" in joined
    assert "local,path=/,mount_tag=hostroot,security_model=none,readonly=on" in joined
    assert "local,path=/tmp/results,mount_tag=results," in joined
    assert "local,path=/tmp/a,mount_tag=s0,security_model=none,multidevs=remap -virtfs" in joined
    assert "local,path=/tmp/b,mount_tag=s1,security_model=none,multidevs=remap,readonly=on" in joined
    assert "console=ttyS1 quiet" in argv[argv.index("-append") + 1]
    assert "-no-reboot" in argv  # L1's panic=-1 reboot ends QEMU

    assert "-monitor" not in argv
    with_monitor = qemu_argv(config, Path("/tmp/results"), shares, Path("/tmp/m/monitor.sock"))
    assert with_monitor[-2:] == ["-monitor", "unix:/tmp/m/monitor.sock,server=on,wait=off"]


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_the_monitor_says_where_each_vcpu_is(tmp_path: Path) -> None:
    # A real QEMU, stopped before its first instruction (-S): two vCPUs at the reset vector.
    sock = tmp_path / "monitor.sock"
    argv = [
        *("qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-smp", "2", "-S", "-nodefaults"),
        *("-display", "none", "-monitor", f"unix:{sock},server=on,wait=off"),
    ]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        text = monitor_query(sock, WHERE_ARE_THE_VCPUS)
    finally:
        qemu.kill()
        qemu.wait()
    assert "CPU #0:" in text and "CPU #1:" in text  # info cpus
    assert text.count("EIP=0000fff0") == 2  # info registers -a: each vCPU at the reset vector
    assert "(qemu) info registers -a\n" in text


def test_a_monitor_that_is_not_there_is_a_line_of_the_report(tmp_path: Path) -> None:
    text = monitor_query(tmp_path / "absent.sock", ["info cpus"], timeout=1)
    assert text.startswith(f"(the QEMU monitor at {tmp_path / 'absent.sock'} did not answer:")
