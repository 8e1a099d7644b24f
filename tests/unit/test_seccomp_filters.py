"""evmm's per-role filters on this kernel (in child processes: a filter is for life) and the size of each
role's allow-list, pinned so that growing one is a decision (docs/security.md lists them)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from evmm.config.devspec import NetSpec, VsockSpec
from evmm.confine.bpf import SECCOMP_RET_ALLOW, SECCOMP_RET_TRAP, Insn, compile_filter, run
from evmm.confine.policy import ROLES, Features, rules
from evmm.confine.seccomp import features as seccomp_features
from evmm.confine.syscalls import number
from evmm.exitcodes import EXIT_SECCOMP
from evmm.machine.config import MachineConfig

ROOT = Path(__file__).resolve().parents[2]

# How many system calls each role allows (docs/security.md, "Per-role allow-lists").  A change here is a
# change of evmm's attack surface: measure it (evmm.confine.trace) and say why in the commit.
ALLOWED = {"main": 70, "vcpu": 21, "io": 30}
# The main thread's extra ioctls with a tap, with vhost-vsock and with vhost-net (the shared vhost set-up, and
# VHOST_NET_SET_BACKEND and TUNSETQUEUE), and with both vhost devices.
MAIN_FEATURE_IOCTLS = {"tap": 5, "vhost": 12, "vhost_net": 12, "both_vhost": 14}


NO_FEATURES = Features()


def _prog(role: str, features: Features = NO_FEATURES) -> list[Insn]:
    return compile_filter(rules(role, os.getpid(), features), SECCOMP_RET_TRAP)


@pytest.mark.parametrize("role", ROLES)
def test_each_roles_allow_list_has_its_documented_size(role: str) -> None:
    assert len(rules(role, 1, Features())) == ALLOWED[role]


def _ioctls(features: Features) -> int:
    rule = next(r for r in rules("main", 1, features) if r.syscall == "ioctl")
    assert rule.check is not None and hasattr(rule.check, "values")
    return len(rule.check.values)


def test_tap_and_vhost_ioctls_only_where_the_machine_has_them() -> None:
    base = _ioctls(Features())
    assert _ioctls(Features(tap=True)) - base == MAIN_FEATURE_IOCTLS["tap"]
    assert _ioctls(Features(vhost=True)) - base == MAIN_FEATURE_IOCTLS["vhost"]
    assert _ioctls(Features(vhost_net=True)) - base == MAIN_FEATURE_IOCTLS["vhost_net"]
    assert _ioctls(Features(vhost=True, vhost_net=True)) - base == MAIN_FEATURE_IOCTLS["both_vhost"]


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        ({"nets": (NetSpec(tap="t0", vhost=True),)}, True),
        ({"nets": (NetSpec(tap="t0", vhost=False),)}, False),
        ({"hotplug_net": 1, "hotplug_vhost": True}, True),
        ({"hotplug_net": 1, "hotplug_vhost": False}, False),
        ({"vsock": VsockSpec(cid=3, vhost=True)}, False),  # vhost-vsock's ioctls, not vhost-net's
        ({}, False),
    ],
)
def test_vhost_net_set_backend_on_main_only_for_a_vhost_net_nic(args: dict[str, Any], allowed: bool) -> None:
    """The guest's DRIVER_OK comes after the main thread's filter: vhost-net attaches the tap then."""
    from evmm.vhost._vhost_ffi import lib

    from evmm.confine.ioctls import TUNSETQUEUE

    config = MachineConfig(kernel=Path("/vmlinux"), **args)
    prog = _prog("main", seccomp_features(config))
    want = SECCOMP_RET_ALLOW if allowed else SECCOMP_RET_TRAP
    assert run(prog, number("ioctl"), [7, int(lib.VHOST_NET_SET_BACKEND)]) == want
    assert run(prog, number("ioctl"), [7, TUNSETQUEUE]) == want
    assert run(
        _prog("vcpu", seccomp_features(config)), number("ioctl"), [7, int(lib.VHOST_NET_SET_BACKEND)]
    ) == (SECCOMP_RET_TRAP)


def test_kvm_run_only_on_vcpu_threads() -> None:
    from evmm.kvm._ffi import lib

    ioctl = number("ioctl")
    assert run(_prog("vcpu"), ioctl, [5, lib.KVM_RUN]) == SECCOMP_RET_ALLOW
    for role in ("main", "io"):
        assert run(_prog(role), ioctl, [5, lib.KVM_RUN]) == SECCOMP_RET_TRAP


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(
    "call", ["execve", "execveat", "ptrace", "mount", "bpf", "kexec_load", "io_uring_setup", "fork", "setuid"]
)
def test_no_role_may_execute_trace_mount_or_load(role: str, call: str) -> None:
    prog = _prog(role, Features(tap=True, vhost=True))
    assert run(prog, number(call)) == SECCOMP_RET_TRAP


def test_only_unix_sockets_without_a_tap() -> None:
    socket_nr = number("socket")
    assert run(_prog("main"), socket_nr, [1]) == SECCOMP_RET_ALLOW  # AF_UNIX
    assert run(_prog("main"), socket_nr, [2]) == SECCOMP_RET_TRAP  # AF_INET
    assert run(_prog("main", Features(tap=True)), socket_nr, [2]) == SECCOMP_RET_ALLOW  # the tap's MTU
    assert run(_prog("main", Features(tap=True)), socket_nr, [16]) == SECCOMP_RET_TRAP  # AF_NETLINK


def _child(role: str, body: str, mode: str = "kill") -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter after putting its main thread under ``role``'s filter."""
    code = textwrap.dedent(
        f"""
        import os, socket, sys
        from evmm.confine import seccomp
        c = seccomp.enable(seccomp.Mode({mode!r}), seccomp.Features())
        c.install({role!r})
        print("confined", flush=True)
        """
    ) + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_a_forbidden_call_is_one_line_and_exit_159() -> None:
    r = _child("io", "socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\nprint('still here')")
    assert r.returncode == EXIT_SECCOMP == 159
    assert "confined" in r.stdout and "still here" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("evmm: seccomp: thread ")
    assert "(role io, tid " in lines[0]
    assert "made a forbidden system call: socket(0xa, 0x80001, 0x0, " in lines[0]


def test_the_line_names_a_worker_thread_and_its_stacked_filter() -> None:
    body = """
        import threading
        from evmm.confine.thread import confine_thread
        def work():
            confine_thread("io")
            os.getppid()
        t = threading.Thread(target=work)
        t.start(); t.join()
        print("survived")
    """
    r = _child("main", body)
    assert r.returncode == 159, r.stderr
    assert "survived" not in r.stdout
    assert "(role io, tid " in r.stderr and "getppid(" in r.stderr


def test_allowed_calls_go_through() -> None:
    body = """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.close()
        fd = os.eventfd(0); os.eventfd_write(fd, 1); assert os.eventfd_read(fd) == 1
        import threading; t = threading.Thread(target=lambda: None); t.start(); t.join()
        print("ok")
    """
    r = _child("main", body)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_fork_is_refused_on_the_main_thread() -> None:
    r = _child("main", "os.fork()\nprint('forked')")
    assert r.returncode == 159 and "forked" not in r.stdout
    assert "clone(" in r.stderr


def test_log_mode_lets_the_call_through() -> None:
    r = _child("io", "os.getppid()\nprint('after')", mode="log")
    assert r.returncode == 0, r.stderr
    assert "after" in r.stdout


MEASURED = Path(__file__).parent / "seccomp_measured.txt"
# Measured while evmm still let libuv make an io_uring; since then the ring is never made (io_uring_setup
# answers ENOSYS before the loop exists), so io_uring_enter is not a call evmm makes.
GONE = {"io_uring_enter"}


def _allowed(role: str, what: str) -> bool:
    """Whether ``role``'s program allows a measured call; with its measured argument where there is one."""
    from evmm.confine.trace import _ARG_CALLS

    call, _, value = what.partition(" ")
    features = Features(tap=True, vhost=True)
    rule = next((r for r in rules(role, os.getpid(), features) if r.syscall == call), None)
    if rule is None:
        return False
    args = [0] * 6
    if value:
        args[_ARG_CALLS[call][1]] = int(value, 16)
    elif call == "tgkill":
        args[0] = os.getpid()
    elif call == "clone":
        args[0] = 0x3D0F00  # pthread_create's flags
    elif rule.check is not None:
        return True  # allowed for some argument; the measurement has no value to try
    return run(_prog(role, features), number(call), args) == SECCOMP_RET_ALLOW


@pytest.mark.parametrize("role", ROLES)
def test_every_call_measured_in_the_linux_tier_is_allowed(role: str) -> None:
    """The measurement (evmm.confine.trace over the linux tier, docs/security.md) against the lists: what a
    role's threads did must pass its filter, and an I/O worker's calls the main filter too (stacked)."""
    from evmm.confine.trace import observed

    seen = observed(MEASURED.read_text())
    assert seen[role], f"no measurement for {role}"
    refused = sorted(w for w in seen[role] - GONE if not _allowed(role, w))
    assert refused == []
    if role == "io":
        assert sorted(w for w in seen[role] if not _allowed("main", w)) == []


@pytest.mark.parametrize("role", ["main", "io"])
def test_file_system_calls_only_with_a_shared_directory(role: str) -> None:
    # getdents64 too: what the control methods import on first use is imported before the filters go on
    # (evmm.confine.preload), so no thread lists a directory without a shared one.
    for call in ("openat2", "renameat2", "linkat", "fchownat", "fsetxattr", "chmod", "getdents64"):
        assert run(_prog(role), number(call)) == SECCOMP_RET_TRAP
        assert run(_prog(role, Features(fs=True)), number(call)) == SECCOMP_RET_ALLOW


def test_msi_rerouting_only_on_the_standard_board() -> None:
    from evmm.kvm._ffi import lib

    routing = int(lib.KVM_SET_GSI_ROUTING)
    assert run(_prog("main"), number("ioctl"), [0, routing]) == SECCOMP_RET_TRAP
    assert run(_prog("main", Features(pci=True)), number("ioctl"), [0, routing]) == SECCOMP_RET_ALLOW
    assert run(_prog("vcpu", Features(pci=True)), number("ioctl"), [0, routing]) == SECCOMP_RET_TRAP


def test_a_snapshot_reads_kvm_state_on_the_main_thread_only() -> None:
    from evmm.kvm._ffi import lib

    for name in ("KVM_GET_XSAVE", "KVM_GET_LAPIC", "KVM_GET_IRQCHIP", "KVM_GET_CLOCK"):
        request = int(getattr(lib, name))
        assert run(_prog("main"), number("ioctl"), [0, request]) == SECCOMP_RET_ALLOW
        assert run(_prog("vcpu"), number("ioctl"), [0, request]) == SECCOMP_RET_TRAP
    for name in ("KVM_SET_XSAVE", "KVM_SET_LAPIC", "KVM_SET_CLOCK"):  # a restore is a new process, unconfined
        assert run(_prog("main"), number("ioctl"), [0, int(getattr(lib, name))]) == SECCOMP_RET_TRAP
    assert run(_prog("main"), number("rename")) == SECCOMP_RET_ALLOW
    assert run(_prog("io"), number("rename")) == SECCOMP_RET_TRAP


def test_the_kernels_workers_in_our_thread_list_are_not_ours_to_filter() -> None:
    from evmm.confine.seccomp import kernel_worker

    # /proc/PID/task/TID/stat of a vhost worker and of a Python thread (flags: the ninth field).
    worker = "4242 (vhost-4200) S 2 0 0 0 -1 2113600 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0"
    python = "4243 (evmm-vcpu0) S 1 4200 4200 0 -1 4194368 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0"
    assert kernel_worker(worker)  # 2113600 = PF_KTHREAD | PF_NOFREEZE | ...
    assert not kernel_worker(python)
    assert kernel_worker("9 (kvm-nx-lpage-re) S 1 9 9 0 -1 16448 0")  # PF_USER_WORKER | ...
    assert not kernel_worker("garbage")


def test_the_standard_board_may_open_a_tap_for_a_nic_added_at_run_time() -> None:
    from pathlib import Path

    from evmm.confine.seccomp import features
    from evmm.machine.config import MachineConfig

    assert features(MachineConfig(kernel=Path("/k"), board="standard")).tap
    assert not features(MachineConfig(kernel=Path("/k"))).tap


def test_building_the_lists_loads_no_device_or_snapshot_module() -> None:
    """The ioctl numbers come from evmm.confine.ioctls, which imports nothing: building a filter must not load
    the modules that issue them (the snapshot code cost ~21 ms of every evmm start for one constant, and its
    format's hashlib maps OpenSSL, 3.5 MiB)."""
    import ast

    from evmm.confine import ioctls

    tree = ast.parse(Path(ioctls.__file__).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    code = (
        "import sys\n"
        "from evmm.confine.policy import Features, rules\n"
        "rules('main', 1, Features(tap=True, vhost=True, vhost_net=True, pci=True))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('evmm.snapshot', 'evmm.devices', 'hashlib'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert run(_prog("main"), number("ioctl"), [0, ioctls.FICLONE]) == SECCOMP_RET_ALLOW
