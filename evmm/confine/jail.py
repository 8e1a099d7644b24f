"""``evmm jail``'s model: what a jail is (``JailSpec``), what goes into its root (``plan``), and the small
API the OCI runtime and the sandbox API use when they run as root (``spawn``, ``cleanup``, ``outside``).

A jail is a directory ``BASE/ID/root`` that becomes the VMM's ``/`` (pivot_root), holding only what that VM
uses, each at the path the VMM is given, so no argument needs rewriting:

- read-only: the kernel, the initrd, read-only drives; the Python interpreter's prefix, the directories its
  packages come from (uvloop, msgpack, cffi) and evmm's own package, and the host libraries the interpreter
  has mapped (read from ``/proc/self/maps`` after importing what ``evmm run`` imports): evmm is Python, so
  the interpreter has to be reachable inside, and this is the least of the host that runs it;
- read-write: writable drives and shared directories (``--fs``; read-only with ``readonly=on``); an empty directory, owned by the jail's user, for each socket the VMM listens
  on (``--api-sock``, ``--qmp``, ``--vsock path=``, ``--virtio-console PATH``), reached from the host at
  ``outside(spec, path)``;
- ``/dev``: a fresh tmpfs with only the nodes the VM needs (``kvm``; ``net/tun`` with a tap, and ``vhost-net``
  where its NICs use it; ``vhost-vsock`` with vhost; ``null``, ``zero``, ``urandom``), owned by the jail's user; ``/proc`` of the jail's own PID
  namespace (it shows only the jail's processes).

Nothing else of the host is there: no /etc, /home, /root, /tmp, /var, no other checkout.  So no ``/dev/pts``
either: ``--virtio-console pty`` is refused (a pty made in there would be out of the host's reach).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path

from evmm.confine.cgroup import Limits
from evmm.errors import ConfigError
from evmm.machine.config import MachineConfig
from evmm.record import record

DEFAULT_BASE = Path("/srv/evmm/jail")
DEFAULT_CGROUP_PARENT = "evmm"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RLIMITS = {"nofile": "RLIMIT_NOFILE", "core": "RLIMIT_CORE", "fsize": "RLIMIT_FSIZE", "nproc": "RLIMIT_NPROC"}
DEFAULT_RLIMITS = {"core": 0, "nofile": 4096}
# Imported before reading /proc/self/maps, so that every shared library ``evmm run`` needs is mapped.
RUN_MODULES = (
    "uvloop",
    "msgpack",
    "_cffi_backend",
    "ctypes",
    "termios",
    "evmm.kvm._kvm_ffi",
    "evmm.vhost._vhost_ffi",
    "evmm.devices.legacy._serial_ffi",
    "evmm.confine._seccomp_ffi",
    "evmm.cli.run_cmd",
    "evmm.machine.microvm",
    "evmm.control",
)


@record(frozen=True)
class JailSpec:
    """One jailed VMM: who it runs as, where its root is, its limits, and the ``evmm run`` arguments."""

    id: str
    uid: int
    gid: int
    run_args: tuple[str, ...]
    base: Path = DEFAULT_BASE
    cgroup_parent: str = DEFAULT_CGROUP_PARENT
    limits: Limits = field(default_factory=Limits)
    netns: str | None = None  # None: the host's; "new": an empty one; a path: join it (ip netns's files)
    keep_fds: tuple[int, ...] = ()
    rlimits: tuple[tuple[str, int], ...] = tuple(DEFAULT_RLIMITS.items())

    @property
    def dir(self) -> Path:
        return self.base / self.id

    @property
    def root(self) -> Path:
        return self.dir / "root"


def check_id(jail_id: str) -> str:
    if not _ID.match(jail_id):
        raise ConfigError(f"jail id {jail_id!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return jail_id


def outside(spec: JailSpec, path: str | Path) -> Path:
    """Where a path inside the jail (a socket the VMM made) is on the host."""
    p = Path(path)
    if not p.is_absolute():
        raise ConfigError(f"{path}: give the jail an absolute path")
    return spec.root / p.relative_to("/")


@record(frozen=True)
class Plan:
    """What the jail's root holds (all paths absolute, as the VMM sees them, and as they are on the host)."""

    readonly: tuple[Path, ...]  # files and directories bound read-only
    writable: tuple[Path, ...]  # files and directories bound read-write (writable drives, shared directories)
    socket_dirs: tuple[Path, ...]  # empty directories, owned by the jail's user
    devices: tuple[str, ...]  # nodes under /dev
    argv: tuple[str, ...]  # the command executed inside
    env: tuple[tuple[str, str], ...]
    cwd: Path


def _run_config(run_args: Sequence[str]) -> tuple[MachineConfig, argparse.Namespace, list[str]]:
    """Parse ``run_args`` as ``evmm run`` does; the config, and the arguments with the defaulted kernel and
    initrd made explicit (the jail must know them, and the jailed evmm has no cache to find them in)."""
    from evmm.cli import run_cmd

    parser = argparse.ArgumentParser(prog="evmm jail ... --")
    sub = parser.add_subparsers(dest="command", required=True)
    run_cmd.register(sub)
    try:
        args = parser.parse_args(["run", *run_args])
    except SystemExit:
        raise ConfigError(f"jail: bad evmm run arguments: {' '.join(run_args)}") from None
    config = run_cmd.config_from_args(args)
    if config.console is not None and config.console.kind == "pty":
        raise ConfigError(
            "jail: --virtio-console pty: the jail has no /dev/pts, and a pty made in there would be out of the "
            "host's reach; give it a socket PATH (reached at BASE/ID/root/PATH) or stdio"
        )
    out = list(run_args)
    if args.kernel is None:
        out += ["--kernel", str(config.kernel)]
    if args.initrd is None and config.initrd is not None:
        out += ["--initrd", str(config.initrd)]
    return config, args, out


def interpreter_paths() -> list[Path]:
    """What the Python running evmm needs, read-only: its prefixes, the package directories of evmm and its
    dependencies, and the host's shared libraries it has mapped."""
    import evmm

    for name in RUN_MODULES:
        importlib.import_module(name)
    paths = {
        Path(sys.base_prefix).resolve(),
        Path(sys.prefix).resolve(),
        Path(evmm.__file__).parent.resolve(),
    }
    for name in ("uvloop", "msgpack", "cffi", "_cffi_backend"):
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin:
            paths.add(
                Path(origin).resolve().parent
                if name == "_cffi_backend"
                else Path(origin).resolve().parent.parent
            )
    libraries = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            libraries.add(Path(parts[5]))
    paths |= libraries | _sonames(libraries)
    interp = Path(sys.executable)
    paths.add(interp)
    paths.add(interp.resolve())
    ldso = Path("/lib64/ld-linux-x86-64.so.2")
    if ldso.exists():
        paths.add(ldso)
    return _minimal(paths)


def _sonames(libraries: set[Path]) -> set[Path]:
    """The symlinks the dynamic loader opens (``libffi.so.8``) for the files mapped (``libffi.so.8.1.2``)."""
    out = set()
    for d in {lib.parent for lib in libraries}:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() and Path(entry.path).resolve() in libraries:
                out.add(Path(entry.path))
    return out


def _minimal(paths: set[Path]) -> list[Path]:
    """Drop paths inside another listed directory; sorted, so that parents are bound before children."""
    dirs = sorted(p for p in paths if p.is_dir())
    out = []
    for p in sorted(paths):
        if any(p != d and d in p.parents for d in dirs):
            continue
        out.append(p)
    return out


def plan(spec: JailSpec, cwd: Path | None = None) -> Plan:
    """Work out the jail's contents from the ``evmm run`` arguments (and reject bad ones: one line)."""
    config, args, run_args = _run_config(spec.run_args)
    cwd = Path.cwd() if cwd is None else cwd

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else cwd / p

    readonly = [absolute(config.kernel)]
    if config.initrd is not None:
        readonly.append(absolute(config.initrd))
    writable: list[Path] = []
    for d in config.drives:
        (readonly if d.readonly else writable).append(absolute(d.path))
    for fs in config.fss:
        (readonly if fs.readonly else writable).append(absolute(fs.path))
    sockets = _sockets(config, args)
    devices = ["kvm", "null", "zero", "urandom"]
    if config.nets or config.hotplug_net:
        devices.append("net/tun")
    wants_vhost_net = [n.vhost for n in config.nets if n.tap is not None]
    if config.hotplug_net:
        wants_vhost_net.append(config.hotplug_vhost)
    # vhost unset means "where /dev/vhost-net opens" (evmm.devices.virtio.net): the jail offers it where the
    # host has it, so a jailed VMM picks the same data path as an unjailed one.
    if True in wants_vhost_net or (None in wants_vhost_net and host_has_device("vhost-net")):
        devices.append("vhost-net")
    if config.vsock is not None and config.vsock.vhost:
        devices.append("vhost-vsock")
    import evmm

    pythonpath = str(Path(evmm.__file__).resolve().parent.parent)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": pythonpath,
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    for k, v in os.environ.items():
        if (k.startswith("EVMM_") and k != "EVMM_CACHE") or k == "TERM":
            env[k] = v
    argv = (str(Path(sys.executable)), "-s", "-m", "evmm", "run", *run_args)
    return Plan(
        readonly=tuple(readonly + interpreter_paths()),
        writable=tuple(writable),
        socket_dirs=tuple(sorted({absolute(p).parent for p in sockets})),
        devices=tuple(devices),
        argv=argv,
        env=tuple(sorted(env.items())),
        cwd=cwd,
    )


def host_has_device(name: str) -> bool:
    return (Path("/dev") / name).exists()


def run_config(run_args: Sequence[str]) -> MachineConfig:
    """The machine ``run_args`` describe (``evmm run``'s parse): for a caller preparing what the jail's user
    must be able to open (drives, shared directories, taps)."""
    return _run_config(run_args)[0]


def sockets(run_args: Sequence[str]) -> list[Path]:
    """The Unix sockets the VMM will listen on, as given (each is at ``outside(spec, path)`` on the host)."""
    config, args, _ = _run_config(run_args)
    return _sockets(config, args)


def _sockets(config: MachineConfig, args: argparse.Namespace) -> list[Path]:
    return [
        p
        for p in (
            getattr(args, "api_sock", None),
            _qmp_path(getattr(args, "qmp", None)),
            config.vsock.path if config.vsock is not None else None,
            config.console.path if config.console is not None else None,
        )
        if p is not None
    ]


def _qmp_path(spec: str | None) -> Path | None:
    if spec is None:
        return None
    from evmm.control.qmp import parse_qmp_spec

    return parse_qmp_spec(spec)


# ---- the API for other evmm parts running as root ------------------------------------------------------------


def jail_argv(spec: JailSpec) -> list[str]:
    """``evmm jail`` arguments for ``spec`` (the CLI is the supervisor: it waits, then cleans up)."""
    argv = [
        sys.executable,
        "-m",
        "evmm",
        "jail",
        "--id",
        spec.id,
        "--uid",
        str(spec.uid),
        "--gid",
        str(spec.gid),
    ]
    argv += ["--base", str(spec.base), "--cgroup-parent", spec.cgroup_parent]
    lim = spec.limits
    if lim.cpus is not None:
        argv += ["--cpu-max", str(lim.cpus)]
    if lim.memory is not None:
        argv += [
            "--memory-max",
            f"{lim.memory // 1024}K" if lim.memory % (1 << 20) else f"{lim.memory >> 20}M",
        ]
    if lim.pids is not None:
        argv += ["--pids-max", str(lim.pids)]
    if lim.io_weight is not None:
        argv += ["--io-weight", str(lim.io_weight)]
    if spec.netns is not None:
        argv += ["--netns", spec.netns]
    for fd in spec.keep_fds:
        argv += ["--keep-fd", str(fd)]
    for name, value in spec.rlimits:
        argv += ["--rlimit", f"{name}={value}"]
    return [*argv, "--", *spec.run_args]


def spawn(spec: JailSpec, **popen: object) -> subprocess.Popen[bytes]:
    """Start the jailed VMM under its supervisor; ``Popen`` keywords (stdin, stdout, ...) pass through.  The
    passed fds (``keep_fds``) must be inheritable."""
    return subprocess.Popen(jail_argv(spec), pass_fds=spec.keep_fds, **popen)  # type: ignore[call-overload,no-any-return]


def cleanup(jail_id: str, base: Path = DEFAULT_BASE, cgroup_parent: str = DEFAULT_CGROUP_PARENT) -> list[str]:
    """Kill whatever is left of jail ``jail_id`` and remove its cgroup and directory (after a SIGKILL of its
    supervisor); returns what was removed."""
    from evmm.confine.jailer import remove_jail

    return remove_jail(check_id(jail_id), base, cgroup_parent)
