"""Containers' state under ``--root``: one directory per container, surviving the caller's restarts.

``ROOT/ID/state.json`` is evmm-oci's record of a container (its bundle, its monitor's pid and start time, its
status as the monitor last wrote it); ``ROOT/ID/monitor.sock`` is the monitor's RPC socket.  Writes are atomic
(a temporary file renamed over the old one), so a reader never sees half a record.  A monitor that is gone
(no such pid, or a pid reused by another process: its start time differs) means the container is stopped,
whatever the file says, as runc decides from its init's pid.

The error messages are runc's where engines match on them (containerd's runc shim and podman look for
"does not exist" and "not running").
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Any

from evmm.errors import EvmmError
from evmm.record import record

OCI_VERSION = "1.0.2"  # the runtime spec version whose state JSON this writes (runtime.md "State")
DEFAULT_ROOT = Path("/run/evmm-oci")
ID_RE = re.compile(r"^[\w+\-.]+$")  # runc's container id rule
STATUSES = ("creating", "created", "running", "paused", "stopped")
STATE_FILE = "state.json"
SOCKET = "monitor.sock"
LOCK = "lock"


class ContainerNotFound(EvmmError):
    pass


@record
class Record:
    id: str
    bundle: str
    rootfs: str  # absolute
    created: str  # RFC 3339, UTC
    status: str = "creating"
    monitor_pid: int = 0
    monitor_start: int = 0  # /proc/PID/stat starttime, against pid reuse
    vmm_pid: int = 0
    vmm_start: int = 0
    exit_status: int | None = None  # as waitpid's status word: code << 8, or the signal number
    annotations: dict[str, str] = field(default_factory=dict)
    # Host-side network plumbing to undo at delete: the netns path and the veth whose ingress we redirected.
    netns: str | None = None
    veth: str | None = None
    cgroup: str | None = None  # the directory the monitor joined (linux.cgroupsPath), removed at delete
    detail: str = ""  # why it stopped, when not the container's own exit (the VM died, ...)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (proc(5) stat field 22), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    return pid > 0 and start_time(pid) == start


def check_id(container_id: str) -> str:
    if not ID_RE.match(container_id) or container_id in (".", ".."):
        raise EvmmError(f"invalid id format: {container_id}")
    return container_id


class Store:
    """The containers under one ``--root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, container_id: str) -> Path:
        return self.root / check_id(container_id)

    def socket(self, container_id: str) -> Path:
        return self.dir(container_id) / SOCKET

    def create(self, rec: Record) -> Path:
        """A new container's directory with its first record; runc's error if the id is taken."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        except OSError as e:
            raise EvmmError(f"--root {self.root}: {e.strerror}") from None
        d = self.dir(rec.id)
        try:
            d.mkdir(mode=0o711)
        except FileExistsError:
            raise EvmmError(f"container with id exists: {rec.id}") from None
        except OSError as e:
            raise EvmmError(f"--root {self.root}: {e.strerror}") from None
        self.save(rec)
        return d

    def save(self, rec: Record) -> None:
        d = self.dir(rec.id)
        tmp = d / f".{STATE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(rec.to_json()))
        os.replace(tmp, d / STATE_FILE)

    def load(self, container_id: str) -> Record:
        path = self.dir(container_id) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ContainerNotFound(f'container "{container_id}" does not exist') from None
        except (OSError, ValueError) as e:
            raise EvmmError(f"{path}: unreadable state ({e})") from None
        return Record.from_json(data)

    def update(self, container_id: str, **changes: Any) -> Record:
        rec = replace(self.load(container_id), **changes)
        self.save(rec)
        return rec

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / STATE_FILE).is_file())

    def remove(self, container_id: str) -> None:
        shutil.rmtree(self.dir(container_id), ignore_errors=True)

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[None]:
        """One command at a time on a container (``create`` racing ``delete``, two ``delete --force``...)."""
        try:
            fd = os.open(self.dir(container_id) / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise ContainerNotFound(f'container "{container_id}" does not exist') from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def status(rec: Record) -> str:
    """The container's status now: the monitor's last word while it lives, else stopped."""
    if rec.status == "creating" and rec.monitor_pid == 0:
        return "creating"
    if not alive(rec.monitor_pid, rec.monitor_start):
        return "stopped"
    return rec.status if rec.status in STATUSES else "stopped"


def oci_state(rec: Record, current: str | None = None) -> dict[str, Any]:
    """The runtime spec's state (runtime.md "State"), plus runc's ``created`` and ``rootfs`` fields."""
    current = current or status(rec)
    state: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "id": rec.id,
        "status": current,
        "pid": rec.monitor_pid if current != "stopped" else 0,
        "bundle": rec.bundle,
        "rootfs": rec.rootfs,
        "created": rec.created,
        "annotations": rec.annotations,
    }
    return state
