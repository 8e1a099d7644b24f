"""``evmm jail``: run ``evmm run`` confined (namespaces, pivot_root, cgroup v2 limits, a dropped uid), as
Firecracker's jailer does; ``evmm jail --cleanup ID`` removes what a killed jail left."""

from __future__ import annotations

import argparse
from pathlib import Path

from evmm.confine.cgroup import Limits
from evmm.confine.jail import DEFAULT_BASE, DEFAULT_CGROUP_PARENT, DEFAULT_RLIMITS, RLIMITS, JailSpec
from evmm.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "jail",
        help="run evmm run in a jail: namespaces, its own root, cgroup limits, an unprivileged user",
        description="As root: make BASE/ID/root holding only what the VM uses, a cgroup with the given "
        "limits, new mount/PID/IPC/UTS (and optionally network) namespaces; pivot_root into it, drop to "
        "--uid/--gid with no_new_privs, and exec `evmm run RUN_ARGS`.  Its sockets are at BASE/ID/root/PATH "
        "on the host.  On exit the directory and cgroup are removed; after a SIGKILL, `evmm jail --cleanup "
        "ID` does it.  Exit status: the VMM's (128+N if signal N killed it), 1 if the jail could not be made.",
    )
    p.add_argument("--id", help="the jail's name (letters, digits, _ . -); also its hostname")
    p.add_argument(
        "--cleanup", metavar="ID", help="kill what is left of jail ID and remove its directory and cgroup"
    )
    p.add_argument("--uid", type=int, help="user the VMM runs as (required)")
    p.add_argument("--gid", type=int, help="group the VMM runs as (required)")
    p.add_argument(
        "--base", type=Path, default=DEFAULT_BASE, help=f"where jail directories go (default {DEFAULT_BASE})"
    )
    p.add_argument(
        "--cgroup-parent",
        default=DEFAULT_CGROUP_PARENT,
        help=f"cgroup (under the cgroup2 mount) holding the jails' cgroups (default {DEFAULT_CGROUP_PARENT})",
    )
    p.add_argument("--cpu-max", type=float, metavar="CPUS", help="cpu.max, in CPUs (e.g. 0.5)")
    p.add_argument("--memory-max", metavar="SIZE", help="memory.max (e.g. 512M), with no swap")
    p.add_argument("--pids-max", type=int, metavar="N", help="pids.max")
    p.add_argument("--io-weight", type=int, metavar="W", help="io.weight, 1-10000")
    p.add_argument("--netns", metavar="new|PATH", help="an empty network namespace, or join the one at PATH")
    p.add_argument("--keep-fd", type=int, action="append", default=[], metavar="FD", help="an fd to pass in")
    p.add_argument(
        "--rlimit",
        action="append",
        default=[],
        metavar="NAME=N",
        help=f"a resource limit ({', '.join(RLIMITS)}); defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_RLIMITS.items()),
    )
    p.add_argument("run_args", nargs=argparse.REMAINDER, metavar="-- RUN_ARGS", help="arguments for evmm run")
    p.set_defaults(func=run)


def _rlimits(items: list[str]) -> tuple[tuple[str, int], ...]:
    out = dict(DEFAULT_RLIMITS)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in RLIMITS or not value.isdigit():
            raise ConfigError(f"--rlimit {item!r}: give NAME=N with NAME one of {', '.join(RLIMITS)}")
        out[name] = int(value)
    return tuple(out.items())


def spec_from_args(args: argparse.Namespace) -> JailSpec:
    from evmm.machine.config import parse_size

    if args.id is None:
        raise ConfigError("jail: --id is required (or --cleanup ID)")
    if args.uid is None or args.gid is None:
        raise ConfigError("jail: --uid and --gid are required: the user and group the VMM runs as")
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    limits = Limits(
        cpus=args.cpu_max,
        memory=parse_size(args.memory_max, "--memory-max") if args.memory_max is not None else None,
        pids=args.pids_max,
        io_weight=args.io_weight,
    )
    return JailSpec(
        id=args.id,
        uid=args.uid,
        gid=args.gid,
        run_args=tuple(run_args),
        base=args.base,
        cgroup_parent=args.cgroup_parent,
        limits=limits,
        netns=args.netns,
        keep_fds=tuple(args.keep_fd),
        rlimits=_rlimits(args.rlimit),
    )


def run(args: argparse.Namespace) -> int:
    if args.cleanup is not None:
        from evmm.confine.jail import cleanup

        for what in cleanup(args.cleanup, args.base, args.cgroup_parent):
            print(f"evmm jail: removed {what}")
        return 0
    from evmm.confine.jailer import run_jail

    return run_jail(spec_from_args(args))
