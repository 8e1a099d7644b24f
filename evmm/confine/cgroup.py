"""A cgroup v2 of a jail's own: its limits, the process in it, and its removal (Documentation/admin-guide/
cgroup-v2.rst).

The jail's cgroup is ``<cgroup2 mount>/<parent>/<id>``.  The parent holds no process, so the controllers can
be enabled for its children ("no internal processes"); the jail's limits are written before its process
joins.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from evmm.errors import ConfigError, EvmmError
from evmm.record import record

CPU_PERIOD_US = 100_000
REMOVE_WAIT = 5.0


@record(frozen=True)
class Limits:
    """Resource limits for one jail; None leaves a knob at the kernel's default (no limit)."""

    cpus: float | None = None  # cpu.max: this many CPUs' worth of time per period
    memory: int | None = None  # memory.max, bytes; memory.swap.max is 0 with it, so the limit is real
    pids: int | None = None  # pids.max
    io_weight: int | None = None  # io.weight (1-10000; the kernel's default is 100)

    def controllers(self) -> list[str]:
        need = [("cpu", self.cpus), ("memory", self.memory), ("pids", self.pids), ("io", self.io_weight)]
        return [name for name, value in need if value is not None]

    def files(self) -> dict[str, str]:
        """What to write into the jail's cgroup, file by file."""
        out = {}
        if self.cpus is not None:
            out["cpu.max"] = f"{max(1000, round(self.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"
        if self.memory is not None:
            out["memory.max"] = str(self.memory)
            out["memory.swap.max"] = "0"
        if self.pids is not None:
            out["pids.max"] = str(self.pids)
        if self.io_weight is not None:
            out["io.weight"] = f"default {self.io_weight}"
        return out


def check_limits(limits: Limits) -> Limits:
    if limits.cpus is not None and not 0.01 <= limits.cpus <= 4096:
        raise ConfigError(f"--cpu-max {limits.cpus}: not between 0.01 and 4096 CPUs")
    if limits.memory is not None and limits.memory < 16 << 20:
        raise ConfigError(f"--memory-max {limits.memory}: below 16 MiB, evmm itself would not fit")
    if limits.pids is not None and limits.pids < 8:
        raise ConfigError(f"--pids-max {limits.pids}: evmm needs a thread per vCPU and I/O workers (>= 8)")
    if limits.io_weight is not None and not 1 <= limits.io_weight <= 10000:
        raise ConfigError(f"--io-weight {limits.io_weight}: not between 1 and 10000")
    return limits


def cgroup2_mount(mountinfo: str | None = None) -> Path:
    """Where the cgroup v2 hierarchy is mounted (proc(5) mountinfo: the field after " - " is the type)."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    for line in text.splitlines():
        fields, _, tail = line.partition(" - ")
        if tail.split(" ", 1)[0] == "cgroup2":
            return Path(fields.split()[4])
    raise EvmmError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")


class Cgroup:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_jail(cls, parent: str, jail_id: str, root: Path | None = None) -> Cgroup:
        return cls((cgroup2_mount() if root is None else root) / parent / jail_id)

    def create(self, limits: Limits) -> None:
        """Make the cgroup with ``limits``; every controller they need must be available (one line if not)."""
        parent = self.path.parent
        root = parent.parent
        wanted = limits.controllers()
        available = (root / "cgroup.controllers").read_text().split()
        missing = [c for c in wanted if c not in available]
        if missing:
            raise EvmmError(
                f"cgroup {root}: controller(s) {', '.join(missing)} not available here "
                f"(cgroup.controllers: {' '.join(available) or 'none'}); is the hierarchy cgroup v2 only?"
            )
        parent.mkdir(exist_ok=True)
        for level in (root, parent):
            if wanted:
                _write(level / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
        try:
            self.path.mkdir()
        except FileExistsError:
            raise EvmmError(
                f"cgroup {self.path} exists: is that jail running? (evmm jail --cleanup ID)"
            ) from None
        for name, value in limits.files().items():
            if name == "memory.swap.max" and not (self.path / name).exists():
                continue  # a kernel without swap accounting: memory.max alone is the limit
            _write(self.path / name, value)

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into the cgroup."""
        _write(self.path / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (memory.events)."""
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except FileNotFoundError:
            pass
        return 0

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (cgroup.kill where the kernel has it, 5.14+)."""
        if not self.path.exists():
            return
        kill = self.path / "cgroup.kill"
        if kill.exists():
            _write(kill, "1")
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, wait: float = REMOVE_WAIT) -> None:
        """Remove the cgroup once its processes are gone (they may take a moment to be reaped)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise EvmmError(f"cgroup {self.path}: cannot remove it: {e.strerror}") from None
                time.sleep(0.05)


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise EvmmError(f"cgroup: writing {value!r} to {path}: {e.strerror}") from None
