"""Building and running a jail (evmm.confine.jail says what is in it), as Firecracker's jailer does, from root:

    supervisor (the caller, host namespaces):  cgroup with limits; BASE/ID/root with empty mount points;
        unshare(CLONE_NEWPID); fork; forward SIGTERM/SIGINT/SIGHUP/SIGUSR2; wait; remove cgroup and directory;
        exit with the VMM's status (128+N for a signal, as a shell shows it)
    child (PID 1 of the new PID namespace):  join the cgroup; join or make the network namespace; new mount,
        IPC and UTS namespaces; every mount private; bind what the plan lists (drives, shared directories); a tmpfs /dev with its nodes;
        /proc; pivot_root into the root, the old root detached; hostname = ID; close inherited fds but the
        kept ones; rlimits; drop to UID:GID with no supplementary groups; no_new_privs; die with the
        supervisor (PR_SET_PDEATHSIG); exec ``python -m evmm run ...``

A step that fails in the child prints one line and exits 1 before the VMM exists.  When the supervisor is
SIGKILLed its child dies with it (PDEATHSIG) and ``evmm jail --cleanup ID`` removes what is left.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import stat
import sys
from pathlib import Path

from evmm.confine import ns
from evmm.confine.cgroup import Cgroup, check_limits
from evmm.confine.jail import RLIMITS, JailSpec, Plan, check_id, plan
from evmm.errors import EvmmError
from evmm.exitcodes import EXIT_ERROR

DEVICE_MODES = {
    "kvm": 0o600,
    "net/tun": 0o600,
    "vhost-net": 0o600,
    "vhost-vsock": 0o600,
    "null": 0o666,
    "zero": 0o666,
    "urandom": 0o666,
}


def run_jail(spec: JailSpec) -> int:
    """Run the jailed VMM to its end and clean up; its exit status."""
    check_id(spec.id)
    check_limits(spec.limits)
    if os.geteuid() != 0:
        raise EvmmError(
            "evmm jail must run as root (it makes namespaces, mounts, a cgroup and drops to --uid)"
        )
    contents = plan(spec)
    if spec.dir.exists():
        raise EvmmError(
            f"jail {spec.id}: {spec.dir} exists (a jail still running, or left over: evmm jail --cleanup {spec.id})"
        )
    cgroup = Cgroup.for_jail(spec.cgroup_parent, spec.id)
    netns_fd = _open_netns(spec.netns)
    try:
        spec.root.mkdir(parents=True, mode=0o755)
        cgroup.create(spec.limits)
        _prepare_root(spec, contents)
        ns.unshare(ns.CLONE_NEWPID)  # the next child is PID 1 of a new PID namespace
        pid = os.fork()
        if pid == 0:
            _child(spec, contents, cgroup, netns_fd)  # never returns
        status = _supervise(pid)
        oom = cgroup.oom_kills()
        if oom:
            print(
                f"evmm jail {spec.id}: the kernel OOM-killed {oom} process(es) in the jail's cgroup "
                f"(memory.max {spec.limits.memory})",
                file=sys.stderr,
            )
        return status
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
        remove_jail(spec.id, spec.base, spec.cgroup_parent, cgroup=cgroup)


def _open_netns(netns: str | None) -> int | None:
    if netns is None or netns == "new":
        return None
    try:
        return os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise EvmmError(f"--netns {netns}: {e.strerror}") from None


def _supervise(pid: int) -> int:
    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    # SIGUSR2 too: evmm prints its threads' stacks on it (a supervisor would die of it).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
        signal.signal(sig, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# ---- the root ----------------------------------------------------------------------------------------------


def _inside(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _mirror(root: Path, path: Path) -> Path:
    """Make ``path`` exist under ``root`` as an empty mount point, re-creating each symlink on the way
    (``/lib64`` -> ``usr/lib64`` -> ``/lib/...``) so that it resolves inside as it does outside; returns the
    resolved host path (where the bind mount goes)."""
    parts = list(path.relative_to("/").parts)
    here = Path("/")
    links = 0
    while parts:
        host = here / parts.pop(0)
        jailed = _inside(root, host)
        if host.is_symlink():
            links += 1
            if links > 40:
                raise EvmmError(f"{path}: too many symlinks")
            target = os.readlink(host)
            if not jailed.is_symlink():
                jailed.symlink_to(target)
            parts = list(Path(os.path.normpath(host.parent / target)).relative_to("/").parts) + parts
            here = Path("/")
        elif parts or host.is_dir():
            jailed.mkdir(mode=0o755, exist_ok=True)
            here = host
        else:
            if not jailed.exists():
                jailed.touch(mode=0o600)
            here = host
    return here


def _prepare_root(spec: JailSpec, contents: Plan) -> None:
    """Mount points and socket directories, made on the host side before the namespaces exist."""
    for p in (*contents.readonly, *contents.writable):
        _mirror(spec.root, p)
    for d in contents.socket_dirs:
        _mirror(spec.root, d)
        os.chown(_inside(spec.root, d), spec.uid, spec.gid)
    for name in ("dev", "proc"):
        (spec.root / name).mkdir(exist_ok=True)
    _mirror(spec.root, contents.cwd)


def _binds(spec: JailSpec, contents: Plan) -> None:
    root = spec.root
    for p, readonly in [*((p, True) for p in contents.readonly), *((p, False) for p in contents.writable)]:
        real = p.resolve()
        # The interpreter's files must stay executable; the VM's images need not.
        ns.bind(str(real), str(_inside(root, real)), readonly=readonly, noexec=p in contents.writable)


def _devices(spec: JailSpec, contents: Plan) -> None:
    dev = spec.root / "dev"
    ns.mount("tmpfs", str(dev), "tmpfs", ns.MS_NOSUID | ns.MS_NOEXEC, "mode=755,size=64k")
    for name in contents.devices:
        host = Path("/dev") / name
        try:
            st = os.stat(host)
        except OSError as e:
            raise EvmmError(f"{host}: {e.strerror} (the VM needs it)") from None
        if not stat.S_ISCHR(st.st_mode):
            raise EvmmError(f"{host}: not a character device")
        node = dev / name
        node.parent.mkdir(exist_ok=True)
        os.mknod(node, stat.S_IFCHR | DEVICE_MODES[name], st.st_rdev)
        os.chown(node, spec.uid, spec.gid)
        os.chmod(node, DEVICE_MODES[name])


def _child(spec: JailSpec, contents: Plan, cgroup: Cgroup, netns_fd: int | None) -> None:
    try:
        cgroup.join()
        if netns_fd is not None:
            ns.setns(netns_fd, ns.CLONE_NEWNET)
            os.close(netns_fd)
        flags = ns.CLONE_NEWNS | ns.CLONE_NEWIPC | ns.CLONE_NEWUTS
        ns.unshare(flags | (ns.CLONE_NEWNET if spec.netns == "new" else 0))
        # Nothing mounted from here on may reach the host's namespace (nor the other way).
        ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
        root = str(spec.root)
        ns.mount(root, root, None, ns.MS_BIND)  # pivot_root needs the new root to be a mount point
        _binds(spec, contents)
        _devices(spec, contents)
        ns.mount("proc", str(spec.root / "proc"), "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)
        ns.sethostname(spec.id)
        os.chdir(root)
        # pivot_root(".", "."): the old root ends up on top of the new one, and is then detached (as runc does).
        ns.pivot_root(".", ".")
        ns.umount_detach(".")
        os.chdir(str(contents.cwd))
        ns.close_fds_except(set(spec.keep_fds))
        for name, value in spec.rlimits:
            limit = getattr(resource, RLIMITS[name])
            resource.setrlimit(limit, (value, value))
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
        ns.prctl(ns.PR_SET_NO_NEW_PRIVS, 1)
        ns.prctl(ns.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        os.execve(contents.argv[0], list(contents.argv), dict(contents.env))
    except BaseException as e:
        reason = str(e)
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror + (f": {e.filename}" if e.filename else "")
        os.write(2, f"evmm jail {spec.id}: {reason}\n".encode())
        os._exit(EXIT_ERROR)


# ---- removal -------------------------------------------------------------------------------------------------


def remove_jail(jail_id: str, base: Path, cgroup_parent: str, cgroup: Cgroup | None = None) -> list[str]:
    """Kill the jail's processes, remove its cgroup and its directory; what was removed."""
    removed = []
    if cgroup is None:
        try:
            cgroup = Cgroup.for_jail(cgroup_parent, jail_id)
        except EvmmError:
            cgroup = None
    if cgroup is not None and cgroup.path.exists():
        cgroup.kill_all()
        cgroup.remove()
        removed.append(str(cgroup.path))
    jail_dir = base / jail_id
    if jail_dir.exists():
        _remove_tree(jail_dir)
        removed.append(str(jail_dir))
    return removed


def _remove_tree(path: Path) -> None:
    """``rm -r`` that stays on the jail directory's file system: the host side of a jail holds only empty
    mount points and sockets (the mounts were in the jail's own namespace), so a mount found here would be
    someone else's: it is left alone, and so is its parent."""
    dev = os.lstat(path).st_dev
    order = []
    for dirpath, dirnames, filenames in os.walk(path):
        keep = []
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                filenames.append(name)
            elif os.lstat(full).st_dev == dev:
                keep.append(name)
            else:
                print(f"evmm jail: {full} is a mount point: not removed", file=sys.stderr)
        dirnames[:] = keep
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dirpath, name))
        order.append(dirpath)
    for dirpath in reversed(order):
        try:
            os.rmdir(dirpath)
        except OSError as e:
            print(f"evmm jail: cannot remove {dirpath}: {e.strerror}", file=sys.stderr)
