"""What a process runs as, typed on the host and turned into the agent's ``exec`` parameters (pure; no I/O).

docs/agent-protocol.md describes each parameter; the container fields follow the OCI runtime spec's
config.json (``process``, ``mounts``, ``linux.namespaces``), so a runtime can pass its bundle's values on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Any

from evmm.errors import EvmmError
from evmm.record import record

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NAMESPACES = ("mount", "uts", "ipc", "pid", "net")


@record(frozen=True)
class Mount:
    """One mount done inside a new container's mount namespace, ``target`` relative to its rootfs."""

    target: str
    type: str | None = None  # "proc", "sysfs", "tmpfs", "devpts", "mqueue"; None for a bind mount
    source: str | None = None
    options: tuple[str, ...] = ()  # mount(8) words: ro, nosuid, bind, rbind, rprivate, mode=755, ...
    data: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "options": list(self.options)}
        for key in ("type", "source", "data"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@record(frozen=True)
class Container:
    """The first process of a container: ``rootfs`` (a directory in the guest) becomes its root."""

    rootfs: str
    mounts: tuple[Mount, ...] = ()
    hostname: str | None = None
    namespaces: tuple[str, ...] = ("mount", "uts", "ipc", "pid")
    readonly_root: bool = False

    def to_wire(self) -> dict[str, Any]:
        unknown = [n for n in self.namespaces if n not in NAMESPACES]
        if unknown:
            raise EvmmError(
                f"container namespace {unknown[0]!r}: evmm-agent supports {', '.join(NAMESPACES)}"
            )
        out: dict[str, Any] = {
            "rootfs": self.rootfs,
            "mounts": [m.to_wire() for m in self.mounts],
            "namespaces": list(self.namespaces),
            "readonly_root": self.readonly_root,
        }
        if self.hostname is not None:
            out["hostname"] = self.hostname
        return out


@record(frozen=True)
class Rlimit:
    type: str  # RLIMIT_NOFILE, NOFILE, ...
    soft: int
    hard: int


@record(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> User:
        """``UID[:GID]`` as docker exec's --user takes it (numbers only: the guest may have no passwd)."""
        uid, _, gid = text.partition(":")
        try:
            u = int(uid)
            g = int(gid) if gid else u
        except ValueError:
            raise EvmmError(f"--user {text!r}: expected UID[:GID] as numbers") from None
        if not (0 <= u < 2**32 - 1 and 0 <= g < 2**32 - 1):
            raise EvmmError(f"--user {text!r}: ids are 0 to 4294967294")
        return cls(u, g)


@record(frozen=True)
class ExecSpec:
    argv: tuple[str, ...]
    env: tuple[str, ...] | None = None  # NAME=VALUE, exactly; None: the agent's defaults
    cwd: str | None = None
    user: User | None = None
    umask: int | None = None
    rlimits: tuple[Rlimit, ...] = ()
    tty: bool = False
    rows: int | None = None
    cols: int | None = None
    stdin: bool = False
    window: int | None = None
    detach: bool = False
    container: Container | None = None
    join: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        if not self.argv or not self.argv[0]:
            raise EvmmError("exec: argv must name a program")
        out: dict[str, Any] = {"argv": list(self.argv), "tty": self.tty, "stdin": self.stdin}
        simple = {"cwd": self.cwd, "umask": self.umask, "rows": self.rows, "cols": self.cols}
        simple |= {"window": self.window, "join": self.join}
        out |= {k: v for k, v in simple.items() if v is not None}
        if self.env is not None:
            out["env"] = list(self.env)
        if self.user is not None:
            out |= {"uid": self.user.uid, "gid": self.user.gid, "groups": list(self.user.groups)}
        if self.rlimits:
            out["rlimits"] = [{"type": r.type, "soft": r.soft, "hard": r.hard} for r in self.rlimits]
        if self.detach:
            out["detach"] = True
        if self.container is not None:
            out["container"] = self.container.to_wire()
        return out | dict(self.extra)


def environment(
    env: Mapping[str, str] | Sequence[str] | None, *, tty: bool, uid: int = 0
) -> tuple[str, ...] | None:
    """The process's environment: a mapping is added over the agent's defaults (PATH, HOME, and TERM with a
    terminal), as ``docker exec --env`` adds to the container's; a sequence of ``NAME=VALUE`` is taken as it
    is (an OCI ``process.env``); None leaves the defaults to the agent."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        return tuple(env)
    base = {"PATH": DEFAULT_PATH, "HOME": "/root" if uid == 0 else "/"}
    if tty:
        base["TERM"] = "xterm"
    return tuple(f"{k}={v}" for k, v in (base | dict(env)).items())
