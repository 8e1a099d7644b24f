"""The sandbox's VMM: an ``evmm run`` process of its own (a VMM crash never takes the caller down),
with a control socket and a hybrid vsock socket in a private directory.

``VmOptions`` holds the typed common options and an ``extra_args`` escape hatch for any other ``evmm run``
option (``--fs path=...,tag=...``, ``--qmp ...``), so callers such as a container runtime can pass what
they need without this module knowing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path

from evmm.errors import EvmmError
from evmm.record import record

AGENT_CID = 3  # any CID above 2 will do: with hybrid vsock it is private to the VM
QUIT_TIMEOUT = 10.0

_prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before any fork (no dlopen in a forked child)


def _die_with_parent() -> None:
    _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: the VMM does not outlive its sandbox's process


@record(frozen=True)
class VmOptions:
    memory: str = "256M"
    cpus: int = 1
    kernel: Path | None = None  # None: the default guest (evmm assets), whose initramfs starts the agent
    initrd: Path | None = None
    append: str | None = None  # the whole kernel command line; None: evmm's default
    drives: tuple[str, ...] = ()  # --drive values: "path=disk.img,readonly=on"
    net: tuple[str, ...] = ()  # --net values: "tap=tap0,mac=52:54:00:12:34:56"
    fs: tuple[str, ...] = ()  # --fs values (virtio-fs): "path=/srv,tag=share"
    extra_args: tuple[str, ...] = ()  # any other `evmm run` arguments, as they are
    agent_port: int = 1024
    boot_timeout: float = 120.0
    console_log: Path | None = None  # where the VM's console and evmm's messages go (kept after close)
    command: tuple[str, ...] = field(default_factory=lambda: (sys.executable, "-m", "evmm"))  # runs evmm

    def argv(self, api_sock: Path, vsock: Path) -> list[str]:
        argv = [*self.command, "run", "--memory", self.memory, "--cpus", str(self.cpus)]
        kernel, initrd = self.kernel, self.initrd
        if kernel is None:
            from evmm.assets import default_guest

            guest = default_guest()
            kernel, initrd = guest.vmlinux, initrd or guest.initramfs
        argv += ["--kernel", str(kernel)]
        if initrd is not None:
            argv += ["--initrd", str(initrd)]
        if self.append is not None:
            argv += ["--append", self.append]
        for flag, values in (("--drive", self.drives), ("--net", self.net), ("--fs", self.fs)):
            for value in values:
                argv += [flag, value]
        argv += ["--api-sock", str(api_sock), "--vsock", f"cid={AGENT_CID},path={vsock}"]
        return [*argv, *self.extra_args]


class VmmProcess:
    """A running ``evmm run`` and its directory (sockets, the console log); ``stop`` ends both."""

    def __init__(self, proc: asyncio.subprocess.Process, workdir: Path, log: Path) -> None:
        self.proc = proc
        self.workdir = workdir
        self.api_sock = workdir / "api.sock"
        self.vsock = workdir / "vsock.sock"
        self.log = log

    @classmethod
    async def start(cls, options: VmOptions) -> VmmProcess:
        # Short, private paths: a Unix socket address holds 107 bytes, and vsock's <path>_<port> adds more.
        workdir = Path(tempfile.mkdtemp(prefix="evmm-sb-", dir="/tmp"))
        log_path = options.console_log or workdir / "console.log"
        try:
            argv = options.argv(workdir / "api.sock", workdir / "vsock.sock")
            with log_path.open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # the caller's Ctrl-C is the caller's, not the VM's
                    preexec_fn=_die_with_parent,
                )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(proc, workdir, log_path)

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_bytes().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r\n", "\n").rstrip().splitlines()[-lines:])

    def failure(self, what: str) -> EvmmError:
        """Why the VMM stopped, in one line: its exit status and its last ``evmm:`` message."""
        tail = self.console_tail(5)
        last = next((ln for ln in reversed(tail.splitlines()) if ln.startswith("evmm:")), None)
        status = f"evmm run exited {self.proc.returncode}" if not self.running else "evmm run is running"
        return EvmmError(f"{what}: {status}{': ' + last.removeprefix('evmm: ') if last else ''}")

    async def stop(self) -> int | None:
        """Ask the VMM to quit over its control socket, kill it if it does not, and remove the directory."""
        from evmm.control import Client

        if self.running:
            with contextlib.suppress(EvmmError, OSError):
                async with Client(self.api_sock) as c:
                    await asyncio.wait_for(c.call("quit"), QUIT_TIMEOUT)
            try:
                await asyncio.wait_for(self.proc.wait(), QUIT_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.proc.returncode


def describe_vsock(devices: Sequence[dict[str, object]]) -> tuple[str, object] | None:
    """From query-vm's device list: ("path", P) for a hybrid vsock device, ("cid", N) for vhost-vsock."""
    for dev in devices:
        virtio = dev.get("virtio")
        if not isinstance(virtio, dict) or virtio.get("device") not in ("virtio-vsock", "vhost-vsock"):
            continue
        vsock = virtio.get("vsock")
        if isinstance(vsock, dict):
            if isinstance(vsock.get("path"), str):
                return ("path", vsock["path"])
            if vsock.get("vhost") and isinstance(vsock.get("cid"), int):
                return ("cid", vsock["cid"])
    return None
