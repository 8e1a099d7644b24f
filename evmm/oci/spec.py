"""A bundle's config.json (OCI runtime spec 1.x, config.md and config-linux.md) read into a typed spec.

Pure: no I/O beyond reading the file.  Every field of config.json falls in one of three classes:

- honoured: evmm-oci does what the spec says (process, root, mounts, hostname, namespaces, memory and CPU
  limits sized into the VM, hooks run on the host, sysctls set in the guest kernel, the cgroup path);
- confined: a restriction of what the container may do to the kernel it shares with the host (seccomp,
  capabilities, LSM labels, the device cgroup, masked paths, ...).  Inside evmm the container has a kernel of
  its own and the VM is the boundary; these are accepted and named in the log at ``create`` (never silently),
  and refused outright with the annotation ``io.evmm.oci.strict=true``;
- unsupported: anything else, a ``SpecError`` at ``create`` naming every such field at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evmm.errors import EvmmError
from evmm.record import record

STRICT_ANNOTATION = "io.evmm.oci.strict"
# Guest memory: at least this much, whatever the memory limit (the guest kernel and the agent's own needs).
MIN_MEMORY = 128 << 20
DEFAULT_MEMORY = 256 << 20
# Added to a memory limit: what the guest kernel keeps for itself (its image, page tables, the initramfs in
# RAM) so that the container gets about the limit it asked for (docs/oci.md).
KERNEL_OVERHEAD = 64 << 20
MAX_VCPUS = 32
NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
# Namespace types the guest gives a container (the agent unshares them); "network" is the VM's NIC, set up by
# evmm-oci on the host side; "cgroup": the guest's cgroup tree is the container's own already.
HONOURED_NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "cgroup")
HOOK_KINDS = ("prestart", "createRuntime", "poststart", "poststop")  # run on the host, as runc runs them


class SpecError(EvmmError):
    """config.json is unreadable, malformed, or asks for what evmm-oci cannot do (every such field named)."""


@record(frozen=True)
class Rlimit:
    type: str  # RLIMIT_NOFILE, ...
    soft: int
    hard: int


@record(frozen=True)
class ProcessSpec:
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    umask: int | None = None
    rlimits: tuple[Rlimit, ...] = ()
    terminal: bool = False
    console_size: tuple[int, int] | None = None  # (rows, cols)


@record(frozen=True)
class Mount:
    destination: str
    type: str | None = None
    source: str | None = None
    options: tuple[str, ...] = ()


@record(frozen=True)
class Namespace:
    type: str
    path: str | None = None


@record(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@record(frozen=True)
class ContainerSpec:
    root: Path  # absolute (config.json's root.path, relative to the bundle)
    process: ProcessSpec | None
    readonly_root: bool = False
    hostname: str | None = None
    mounts: tuple[Mount, ...] = ()
    namespaces: tuple[Namespace, ...] = ()
    memory: int = DEFAULT_MEMORY  # guest RAM, bytes
    vcpus: int = 1
    cpuset: tuple[int, ...] = ()  # linux.resources.cpu.cpus: host CPUs the VM may run on
    cpu_weight: int | None = None  # linux.resources.cpu.shares, for the VM's cgroup
    cgroups_path: str | None = None
    sysctl: tuple[tuple[str, str], ...] = ()
    hooks: tuple[tuple[str, Hook], ...] = ()  # (kind, hook), in the order of config.json
    annotations: tuple[tuple[str, str], ...] = ()
    confined: tuple[str, ...] = ()  # the confined fields present (see the module docstring)

    def hooks_of(self, kind: str) -> list[Hook]:
        return [h for k, h in self.hooks if k == kind]

    def namespace(self, kind: str) -> Namespace | None:
        return next((n for n in self.namespaces if n.type == kind), None)

    @property
    def annotation_map(self) -> dict[str, str]:
        return dict(self.annotations)


# Fields by class.  A path names a field of config.json as the spec does (``linux.resources.memory.limit``).
CONFINED = frozenset(
    {
        "process.capabilities",
        "process.noNewPrivileges",
        "process.apparmorProfile",
        "process.selinuxLabel",
        "process.oomScoreAdj",
        "linux.seccomp",
        "linux.maskedPaths",
        "linux.readonlyPaths",
        "linux.mountLabel",
        "linux.resources.devices",
        "linux.resources.pids",
        "linux.resources.blockIO",
        "linux.resources.memory.reservation",
        "linux.resources.memory.swappiness",
        "linux.resources.memory.kernel",
        "linux.resources.memory.kernelTCP",
        "linux.resources.memory.useHierarchy",
        "linux.resources.memory.checkBeforeUpdate",
    }
)


class _Reader:
    """Walks config.json, collecting the unsupported and confined fields it meets."""

    def __init__(self) -> None:
        self.unsupported: list[str] = []
        self.malformed: list[str] = []
        self.confined: list[str] = []

    def obj(self, value: Any, path: str, known: Sequence[str]) -> dict[str, Any]:
        """``value`` as an object; keys outside ``known`` are unsupported (or confined, by ``CONFINED``)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.malformed.append(f"{path} is not an object")
            return {}
        for key in value:
            if key in known:
                continue
            where = f"{path}.{key}" if path else key
            if where in CONFINED:
                if not _empty(value[key]):
                    self.confined.append(where)
            elif not _empty(value[key]):
                self.unsupported.append(where)
        return value

    def check(self, where: str, strict: bool) -> None:
        """``SpecError`` naming every problem met, if any."""
        problems = [*self.malformed]
        if self.unsupported:
            problems.append("unsupported: " + ", ".join(self.unsupported))
        if strict and self.confined:
            problems.append(f"not enforced inside a VM ({STRICT_ANNOTATION}): " + ", ".join(self.confined))
        if problems:
            raise SpecError(f"{where}: " + "; ".join(problems))

    def typed(self, value: Any, path: str, kind: type, what: str) -> Any:
        """``value`` when it is of ``kind`` (a bool is no integer here), else None and a problem noted."""
        if value is None:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.malformed.append(f"{path} is not {what}")
            return None
        return value

    def strings(self, value: Any, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            self.malformed.append(f"{path} is not a list of strings")
            return ()
        return tuple(value)

    def uint(self, value: Any, path: str, limit: int = 1 << 63) -> int | None:
        v = self.typed(value, path, int, "an integer")
        if v is not None and not 0 <= v < limit:
            self.malformed.append(f"{path} {v} is out of range")
            return None
        return v  # type: ignore[no-any-return]


def _empty(value: Any) -> bool:
    """A field set to nothing (null, false, 0, "", [] or {}) asks for nothing."""
    return value in (None, False, 0, "", [], {})


def load(bundle: Path) -> ContainerSpec:
    """``bundle/config.json`` as a ``ContainerSpec``; ``SpecError`` naming every problem at once."""
    path = bundle / "config.json"
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise SpecError(f"{path}: not JSON ({e})") from None
    return parse(config, bundle)


def parse(config: Any, bundle: Path) -> ContainerSpec:
    r = _Reader()
    top = r.obj(
        config,
        "",
        (
            "ociVersion",
            "root",
            "mounts",
            "process",
            "hostname",
            "domainname",
            "hooks",
            "annotations",
            "linux",
        ),
    )
    version = top.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        r.malformed.append(f"ociVersion {version!r} is not a 1.x version")
    annotations = _annotations(r, top.get("annotations"))
    root_obj = r.obj(top.get("root"), "root", ("path", "readonly"))
    root_path = r.typed(root_obj.get("path"), "root.path", str, "a string")
    if not root_path:
        r.malformed.append("root.path is missing")
        root_path = "rootfs"
    process = _process(r, top.get("process"))
    mounts = _mounts(r, top.get("mounts"))
    hooks = _hooks(r, top.get("hooks"))
    linux = r.obj(
        top.get("linux"),
        "linux",
        ("namespaces", "resources", "cgroupsPath", "sysctl", "rootfsPropagation", "devices"),
    )
    namespaces = _namespaces(r, linux.get("namespaces"))
    if not any(n.type == "network" for n in namespaces):
        r.unsupported.append("the host's network (linux.namespaces has no network entry; a VM has its own)")
    devices = linux.get("devices")
    if devices:  # device nodes to create in the container's /dev: the guest has only its own devices
        r.unsupported.append("linux.devices")
    propagation = r.typed(linux.get("rootfsPropagation"), "linux.rootfsPropagation", str, "a string")
    if propagation not in (None, "", "private", "rprivate", "slave", "rslave"):
        r.unsupported.append(f"linux.rootfsPropagation={propagation}")
    sysctl = _sysctl(r, linux.get("sysctl"))
    cgroups_path = r.typed(linux.get("cgroupsPath"), "linux.cgroupsPath", str, "a string")
    memory, vcpus, cpuset, weight = _resources(r, linux.get("resources"))
    domainname = r.typed(top.get("domainname"), "domainname", str, "a string")
    if domainname:
        r.unsupported.append("domainname")

    strict = annotations.get(STRICT_ANNOTATION, "").lower() in ("1", "true", "yes", "on")
    r.check(str(bundle / "config.json"), strict)
    return ContainerSpec(
        root=(bundle / root_path).absolute(),
        process=process,
        readonly_root=bool(root_obj.get("readonly")),
        hostname=r.typed(top.get("hostname"), "hostname", str, "a string") or None,
        mounts=mounts,
        namespaces=namespaces,
        memory=memory,
        vcpus=vcpus,
        cpuset=cpuset,
        cpu_weight=weight,
        cgroups_path=cgroups_path or None,
        sysctl=sysctl,
        hooks=hooks,
        annotations=tuple(annotations.items()),
        confined=tuple(r.confined),
    )


def parse_process(value: Any, where: str) -> ProcessSpec:
    """An OCI process object on its own (``exec --process FILE``)."""
    r = _Reader()
    process = _process(r, value)
    r.check(where, strict=False)
    if process is None:
        raise SpecError(f"{where}: no process")
    return process


def _annotations(r: _Reader, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        r.malformed.append("annotations is not an object of strings")
        return {}
    return dict(value)


def _process(r: _Reader, value: Any) -> ProcessSpec | None:
    if value is None:
        return None
    p = r.obj(
        value,
        "process",
        ("terminal", "consoleSize", "cwd", "env", "args", "rlimits", "user"),
    )
    args = r.strings(p.get("args"), "process.args")
    if not args:
        r.malformed.append("process.args is empty")
    cwd = r.typed(p.get("cwd"), "process.cwd", str, "a string") or "/"
    if not cwd.startswith("/"):
        r.malformed.append(f"process.cwd {cwd!r} is not absolute")
    user = r.obj(p.get("user"), "process.user", ("uid", "gid", "umask", "additionalGids"))
    gids = user.get("additionalGids") or []
    if not isinstance(gids, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gids):
        r.malformed.append("process.user.additionalGids is not a list of integers")
        gids = []
    size = r.obj(p.get("consoleSize"), "process.consoleSize", ("height", "width"))
    rows, cols = (
        r.uint(size.get("height"), "process.consoleSize.height", 1 << 16),
        r.uint(size.get("width"), "process.consoleSize.width", 1 << 16),
    )
    rlimits = []
    for i, item in enumerate(p.get("rlimits") or []):
        lim = r.obj(item, f"process.rlimits[{i}]", ("type", "soft", "hard"))
        kind = r.typed(lim.get("type"), f"process.rlimits[{i}].type", str, "a string")
        soft = r.uint(lim.get("soft"), f"process.rlimits[{i}].soft", 1 << 64)
        hard = r.uint(lim.get("hard"), f"process.rlimits[{i}].hard", 1 << 64)
        if kind and not kind.startswith("RLIMIT_"):
            r.malformed.append(f"process.rlimits[{i}].type {kind!r} is not an RLIMIT_ name")
        elif kind and soft is not None and hard is not None:
            rlimits.append(Rlimit(kind, soft, hard))
    return ProcessSpec(
        args=args,
        env=r.strings(p.get("env"), "process.env"),
        cwd=cwd,
        uid=r.uint(user.get("uid"), "process.user.uid", 1 << 32) or 0,
        gid=r.uint(user.get("gid"), "process.user.gid", 1 << 32) or 0,
        additional_gids=tuple(gids),
        umask=r.uint(user.get("umask"), "process.user.umask", 0o1000),
        rlimits=tuple(rlimits),
        terminal=bool(r.typed(p.get("terminal"), "process.terminal", bool, "a boolean")),
        console_size=(rows, cols) if rows and cols else None,
    )


def _mounts(r: _Reader, value: Any) -> tuple[Mount, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        r.malformed.append("mounts is not a list")
        return ()
    out = []
    for i, item in enumerate(value):
        m = r.obj(item, f"mounts[{i}]", ("destination", "type", "source", "options"))
        dest = r.typed(m.get("destination"), f"mounts[{i}].destination", str, "a string")
        if not dest or not dest.startswith("/"):
            r.malformed.append(f"mounts[{i}].destination {dest!r} is not an absolute path")
            continue
        out.append(
            Mount(
                destination=dest,
                type=r.typed(m.get("type"), f"mounts[{i}].type", str, "a string"),
                source=r.typed(m.get("source"), f"mounts[{i}].source", str, "a string"),
                options=r.strings(m.get("options"), f"mounts[{i}].options"),
            )
        )
    return tuple(out)


def _hooks(r: _Reader, value: Any) -> tuple[tuple[str, Hook], ...]:
    hooks = r.obj(value, "hooks", HOOK_KINDS)
    out = []
    for kind in HOOK_KINDS:
        items = hooks.get(kind) or []
        if not isinstance(items, list):
            r.malformed.append(f"hooks.{kind} is not a list")
            continue
        for i, item in enumerate(items):
            h = r.obj(item, f"hooks.{kind}[{i}]", ("path", "args", "env", "timeout"))
            path = r.typed(h.get("path"), f"hooks.{kind}[{i}].path", str, "a string")
            if not path or not path.startswith("/"):
                r.malformed.append(f"hooks.{kind}[{i}].path {path!r} is not an absolute path")
                continue
            timeout = r.uint(h.get("timeout"), f"hooks.{kind}[{i}].timeout", 1 << 31)
            out.append(
                (
                    kind,
                    Hook(
                        path,
                        r.strings(h.get("args"), f"hooks.{kind}[{i}].args"),
                        r.strings(h.get("env"), f"hooks.{kind}[{i}].env"),
                        timeout or None,
                    ),
                )
            )
    return tuple(out)


def _namespaces(r: _Reader, value: Any) -> tuple[Namespace, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        r.malformed.append("linux.namespaces is not a list")
        return ()
    out: list[Namespace] = []
    for i, item in enumerate(value):
        ns = r.obj(item, f"linux.namespaces[{i}]", ("type", "path"))
        kind = ns.get("type")
        if kind not in NAMESPACES:
            r.malformed.append(f"linux.namespaces[{i}].type {kind!r} is not a namespace type")
            continue
        if any(n.type == kind for n in out):
            r.malformed.append(f"linux.namespaces: {kind} given twice")
            continue
        path = r.typed(ns.get("path"), f"linux.namespaces[{i}].path", str, "a string") or None
        if kind not in HONOURED_NAMESPACES:
            r.unsupported.append(f"linux.namespaces[{kind}]")
        elif path is not None and kind != "network":
            # Joining another container's namespace would need that container in this VM.
            r.unsupported.append(f"linux.namespaces[{kind}].path")
        out.append(Namespace(kind, path))
    return tuple(out)


def _sysctl(r: _Reader, value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        r.malformed.append("linux.sysctl is not an object of strings")
        return ()
    for key in value:
        if not key or "/" in key or ".." in key or not key.replace(".", "").replace("_", "").isalnum():
            r.malformed.append(f"linux.sysctl key {key!r} is not a sysctl name")
    return tuple(sorted(value.items()))


def _resources(r: _Reader, value: Any) -> tuple[int, int, tuple[int, ...], int | None]:
    """(guest memory bytes, vCPUs, cpuset, cpu weight) from linux.resources."""
    res = r.obj(value, "linux.resources", ("memory", "cpu"))  # devices, pids, blockIO: CONFINED
    mem = r.obj(
        res.get("memory"),
        "linux.resources.memory",
        ("limit", "swap", "disableOOMKiller"),
    )
    memory = DEFAULT_MEMORY
    limit = mem.get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        # The guest gets the limit plus what its kernel keeps, rounded up to a MiB, never less than MIN_MEMORY.
        memory = max(MIN_MEMORY, -(-(limit + KERNEL_OVERHEAD) // (1 << 20)) << 20)
    elif limit not in (None, -1, 0):
        r.malformed.append(f"linux.resources.memory.limit {limit!r} is not a byte count")
    if mem.get("disableOOMKiller"):
        r.unsupported.append("linux.resources.memory.disableOOMKiller")
    # swap: the guest has no swap, so any swap limit at or above the memory limit holds.
    cpu = r.obj(res.get("cpu"), "linux.resources.cpu", ("shares", "quota", "period", "cpus", "burst"))
    vcpus = 1
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and not isinstance(quota, bool) and quota > 0:
        period = period if isinstance(period, int) and period > 0 else 100_000
        vcpus = max(1, math.ceil(quota / period))
    cpuset = _cpu_list(r, cpu.get("cpus"))
    if cpuset:
        vcpus = len(cpuset) if not (isinstance(quota, int) and quota > 0) else min(vcpus, len(cpuset))
    if vcpus > MAX_VCPUS:
        r.malformed.append(f"linux.resources.cpu asks for {vcpus} vCPUs; at most {MAX_VCPUS}")
    shares = r.uint(cpu.get("shares"), "linux.resources.cpu.shares", 1 << 20)
    return memory, vcpus, cpuset, shares or None


def _cpu_list(r: _Reader, value: Any) -> tuple[int, ...]:
    """The cpuset syntax of linux.resources.cpu.cpus ("0-3,7") as a sorted tuple."""
    if not value:
        return ()
    if not isinstance(value, str):
        r.malformed.append("linux.resources.cpu.cpus is not a string")
        return ()
    cpus: set[int] = set()
    try:
        for part in value.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first or last >= 4096:
                raise ValueError(part)
            cpus.update(range(first, last + 1))
    except ValueError:
        r.malformed.append(f"linux.resources.cpu.cpus {value!r} is not a CPU list")
        return ()
    return tuple(sorted(cpus))


def environ(env: Sequence[str]) -> Mapping[str, str]:
    """process.env as a mapping (the last of duplicate names wins, as execve's callers see it)."""
    out: dict[str, str] = {}
    for item in env:
        name, _, value = item.partition("=")
        out[name] = value
    return out
