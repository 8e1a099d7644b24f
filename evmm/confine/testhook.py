"""Test-only control methods, for the linux tier's confinement tests:

- ``test-forbidden-syscall`` makes a real evmm thread make a system call its filter forbids, to see evmm
  stop with its line and exit code;
- ``test-inspect`` answers, from inside the VMM process, who it runs as and which paths it can see (a
  jailed evmm must see none of the host's).

They exist only in a VMM started with ``EVMM_TEST_HOOKS=1`` in its environment (``evmm run`` registers them
then, and only then; the first only with seccomp on); no client can reach them otherwise.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from evmm.control.commands import Call, Command, Param
from evmm.devices.virtio.blk.backend import IoWorkers

METHOD = "test-forbidden-syscall"
WAIT = 5.0


def _execve() -> int:
    try:
        os.execv("/nonexistent/evmm-seccomp-test", ["evmm-seccomp-test"])
    except OSError as e:
        return e.errno or 0
    return 0  # pragma: no cover - execv does not return


def _socket_inet6() -> int:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError as e:
        return e.errno or 0
    return 0


CALLS: dict[str, Callable[[], int]] = {"execve": _execve, "socket": _socket_inet6}


def _on_worker(call: Callable[[], int]) -> int:
    """Run ``call`` on a fresh I/O worker thread, as a block device's requests run (filters stacked)."""
    workers: IoWorkers[int] = IoWorkers(1, "evmm-test", lambda e: errno.EFAULT)
    try:
        workers.submit(0, call)
        if not workers.wait(WAIT):
            return errno.ETIMEDOUT
        return workers.collect()[0][1]
    finally:
        workers.close()


# From /proc rather than uname(2), getuid(2), getgroups(2)...: no role's filter allows those.
def _hostname() -> str:
    with open("/proc/sys/kernel/hostname") as f:
        return f.read().strip()


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").partition(":\t")[::2] for line in f)


def test_commands(confined: bool) -> list[Command]:
    return [forbidden_syscall_command(), inspect_command()] if confined else [inspect_command()]


def inspect_command() -> Command:
    async def handler(c: Call) -> dict[str, Any]:
        status = _status()
        return {
            "uid": int(status["Uid"].split()[0]),
            "gid": int(status["Gid"].split()[0]),
            "groups": [int(g) for g in status.get("Groups", "").split()],
            "pid": os.getpid(),
            "hostname": _hostname(),
            "paths": {p: os.path.lexists(p) for p in c.params["paths"]},
        }

    return Command(
        "test-inspect",
        handler,
        "test only: the VMM's uid, gid, pid, hostname, and which of the given paths it can see",
        {"paths": Param(list, "paths to look for", default=[])},
    )


def forbidden_syscall_command() -> Command:
    async def handler(c: Call) -> dict[str, Any]:
        call = CALLS[c.params["call"]]
        # In kill mode the process ends inside the call; in log mode the call runs and its errno comes back.
        err = call() if c.params["thread"] == "main" else _on_worker(call)
        return {"errno": err, "error": os.strerror(err) if err else ""}

    return Command(
        METHOD,
        handler,
        "test only: make a thread issue a system call its seccomp filter forbids",
        {
            "thread": Param(
                str, "main (the reactor) or io (an I/O worker)", default="main", choices=("main", "io")
            ),
            "call": Param(
                str, "execve of a missing file, or socket(AF_INET6)", default="execve", choices=tuple(CALLS)
            ),
        },
    )
