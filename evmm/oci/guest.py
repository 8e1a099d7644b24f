"""What a container monitor needs of its microVM, as a typed protocol: boot it, run processes in it, pause it.

The monitor (evmm/oci/monitor.py) is written against ``GuestFactory``/``Guest``/``GuestProcess`` only.  The
real implementation drives a VMM and the in-guest agent through ``evmm.sandbox``; tests put a fake behind
the same protocol (tests/fakes/oci_guest.py), named by ``EVMM_OCI_GUEST=module:attribute`` (a factory).
"""

from __future__ import annotations

import importlib
import os
import signal as signals
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from evmm.errors import EvmmError
from evmm.record import record

GUEST_ENV = "EVMM_OCI_GUEST"
STDOUT, STDERR = 1, 2


@record(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int = 0
    signal: int | None = None

    @property
    def wait_status(self) -> int:
        """As waitpid(2) encodes it (what ``os.waitstatus_to_exitcode`` decodes)."""
        return self.signal if self.signal is not None else (self.code & 0xFF) << 8

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(128 + os.WTERMSIG(status), os.WTERMSIG(status))
        return cls(os.WEXITSTATUS(status))

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signals.Signals(self.signal).name}"
        return f"exit status {self.code}"


@record(frozen=True)
class Share:
    """A host directory the guest sees over virtio-fs, under ``tag``."""

    tag: str
    path: Path
    readonly: bool = False


@record(frozen=True)
class VmPlan:
    """The microVM of one container."""

    memory: int  # bytes
    vcpus: int
    kernel: Path | None = None
    initrd: Path | None = None
    shares: tuple[Share, ...] = ()
    tap: str | None = None  # a tap in the container's network namespace, which the VMM shares
    mac: str | None = None  # the guest NIC's MAC
    guest_setup: tuple[tuple[str, ...], ...] = ()  # commands run in the guest before the container's process
    append: tuple[str, ...] = ()  # extra kernel command line words
    console_log: Path | None = None  # the VM's console and the VMM's messages (kept in the state directory)


@record(frozen=True)
class ProcessRequest:
    """One process to start in the guest: the agent's ``exec`` parameters (docs/agent-protocol.md)."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    umask: int | None = None
    rlimits: tuple[tuple[str, int, int], ...] = ()
    tty: bool = False
    rows: int = 24
    cols: int = 80
    stdin: bool = True
    # stderr into stdout's pipe in the guest (2>&1): the caller's stdout and stderr are one pipe or file, so
    # the process's writes to both must stay in the order it made them, as they would with runc.
    merge_stderr: bool = False
    container: dict[str, Any] | None = None  # the agent's container map: the container's first process
    join: bool = False  # into the first process's namespaces and root (runc exec)


class GuestProcess(Protocol):
    def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """(STDOUT or STDERR, bytes) in the order the guest read them; ends when both streams are closed."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def signal(self, signum: int) -> None: ...

    async def resize(self, rows: int, cols: int) -> None: ...

    async def wait(self) -> ExitStatus: ...


class Guest(Protocol):
    vmm_pid: int

    async def exec(self, request: ProcessRequest) -> GuestProcess: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def stopped(self) -> str:
        """Returns when the VM is gone, saying why."""
        ...

    async def close(self) -> None:
        """Stop the VM and its VMM; nothing of it is left."""
        ...


class GuestFactory(Protocol):
    async def boot(self, plan: VmPlan) -> Guest: ...


def load_factory() -> GuestFactory:
    """The guest implementation: ``$EVMM_OCI_GUEST`` (``module:attribute``, for tests) or evmm's sandbox."""
    name = os.environ.get(GUEST_ENV)
    if name:
        module, _, attr = name.partition(":")
        try:
            factory: GuestFactory = getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as e:
            raise EvmmError(f"{GUEST_ENV}={name}: {e}") from None
        return factory
    try:
        sandbox = importlib.import_module("evmm.oci.sandbox_guest")
    except ImportError as e:
        raise EvmmError(f"this evmm has no guest agent support (evmm.sandbox): {e}") from None
    real: GuestFactory = sandbox.SandboxGuestFactory()
    return real
