"""``evmm-oci``: a runc-compatible OCI runtime whose containers each run in a microVM.

The global options and sub-commands are runc's, as containerd's runc shim (go-runc) and podman's conmon
invoke them: ``evmm-oci [--root DIR] [--log FILE] [--log-format text|json] [--systemd-cgroup] COMMAND ...``.
Every failure is one line, in the log (as json when asked: engines report its last error) and on stderr,
and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from evmm.errors import EvmmError
from evmm.oci import cgroups, features, launch, plan, rpc
from evmm.oci import spec as spec_mod
from evmm.oci.guest import ExitStatus
from evmm.oci.runlog import RuntimeLog
from evmm.oci.state import (
    DEFAULT_ROOT,
    OCI_VERSION,
    ContainerNotFound,
    Record,
    Store,
    alive,
    now_rfc3339,
    oci_state,
    status,
)

KILL_WAIT = 10.0  # seconds for a SIGKILLed monitor to be gone before `delete --force` gives up


def parse_signal(text: str) -> int:
    """runc's signal syntax: a number, or a name with or without SIG (TERM, SIGTERM, term)."""
    if text.isdigit():
        n = int(text)
        if n in signal.valid_signals():
            return n
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise EvmmError(f"unknown signal {text!r}")


def _load_running(store: Store, container_id: str, what: str) -> Record:
    rec = store.load(container_id)
    now = status(rec)
    if now == "stopped":
        raise EvmmError("container not running")
    if now == "creating":
        raise EvmmError(f"cannot {what} a container that is being created")
    return rec


def _call(store: Store, container_id: str, method: str, params: dict[str, object] | None = None) -> object:
    return asyncio.run(rpc.call(store.socket(container_id), method, params))


# ---- commands -------------------------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    container_id = args.id
    bundle = Path(args.bundle).absolute()
    spec = spec_mod.load(bundle)
    if spec.process is None:
        raise EvmmError(f"{bundle / 'config.json'}: no process to run")
    if spec.confined:
        log.warning(
            f"container {container_id}: enforced by the VM boundary, not inside the guest: "
            + ", ".join(spec.confined)
        )
    rec = Record(
        id=container_id,
        bundle=str(bundle),
        rootfs=str(spec.root),
        created=now_rfc3339(),
        annotations=spec.annotation_map,
    )
    launch.create(
        store,
        log,
        rec,
        spec,
        console_socket=args.console_socket,
        pid_file=args.pid_file,
        options=launch.RuntimeOptions(args.systemd_cgroup, _image(args.kernel), _image(args.initrd)),
    )
    return 0


def _image(path: str | None) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise EvmmError(f"{path}: no such guest image")
    return Path(path).absolute()


def cmd_start(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    rec = store.load(args.id)
    now = status(rec)
    if now == "stopped":
        raise EvmmError("cannot start a container that has stopped")
    if now != "created":
        raise EvmmError(f"cannot start an already {now} container")
    _call(store, args.id, "start")
    return 0


def cmd_run(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    """create + start; without --detach, wait and exit as the container's process did."""
    cmd_create(args, store, log)
    pid = store.load(args.id).monitor_pid
    try:
        _call(store, args.id, "start")
    except EvmmError:
        os.waitpid(pid, 0)
        store.remove(args.id)
        raise
    if args.detach:
        return 0
    _pid, wait_status = os.waitpid(pid, 0)
    store.remove(args.id)
    # As `runc run`: the container's exit code, or 128 + the signal that killed it.
    return ExitStatus.from_wait_status(wait_status).code


def cmd_state(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    print(json.dumps(oci_state(store.load(args.id)), indent=2))
    return 0


def cmd_kill(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    signum = parse_signal(args.signal)
    _load_running(store, args.id, "kill")
    _call(store, args.id, "kill", {"signal": signum, "all": bool(args.all)})
    return 0


def cmd_delete(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    try:
        with store.locked(args.id):
            rec = store.load(args.id)
            now = status(rec)
            if now != "stopped":
                if not args.force:
                    raise EvmmError(f"cannot delete container {args.id} that is not stopped: {now}")
                _kill_for_good(rec)
            _cleanup(rec, log)
            store.remove(args.id)
    except ContainerNotFound:
        if args.force:
            store.remove(args.id)  # runc: a half-made directory goes, and --force of nothing succeeds
            return 0
        raise
    return 0


def _kill_for_good(rec: Record) -> None:
    """SIGKILL the monitor (its VMM follows: PR_SET_PDEATHSIG) and wait until it is gone."""
    for pid, start in ((rec.monitor_pid, rec.monitor_start), (rec.vmm_pid, rec.vmm_start)):
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + KILL_WAIT
    while alive(rec.monitor_pid, rec.monitor_start) or alive(rec.vmm_pid, rec.vmm_start):
        if time.monotonic() > deadline:
            raise EvmmError(f"container {rec.id}: its monitor (pid {rec.monitor_pid}) did not die on SIGKILL")
        time.sleep(0.02)


def _cleanup(rec: Record, log: RuntimeLog) -> None:
    """What the monitor could not undo itself if it was killed: the cgroup; then the poststop hooks."""
    if rec.cgroup:
        cgroups.remove(Path(rec.cgroup))
    try:
        spec = spec_mod.load(Path(rec.bundle))
    except EvmmError:
        return  # the bundle is gone already: nothing more to run
    from evmm.oci import hooks

    for hook in spec.hooks_of("poststop"):
        try:
            asyncio.run(hooks.run_all([hook], oci_state(rec, "stopped"), "poststop"))
        except EvmmError as e:  # runtime spec: a failed poststop hook is a warning
            log.warning(str(e))


def cmd_exec(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    _load_running(store, args.id, "exec in")
    if args.process:
        try:
            raw = json.loads(Path(args.process).read_text())
        except (OSError, ValueError) as e:
            raise EvmmError(f"--process {args.process}: {e}") from None
        proc = spec_mod.parse_process(raw, f"--process {args.process}")
    else:
        if not args.command:
            raise EvmmError("exec: no command (give --process FILE or COMMAND [ARG...])")
        proc = _process_from_args(args, store)
    request = plan.process_request(proc, stdin=True, join=True)
    return launch.exec_process(
        store,
        log,
        args.id,
        request,
        console_socket=args.console_socket,
        pid_file=args.pid_file,
        detach=args.detach,
    )


def _process_from_args(args: argparse.Namespace, store: Store) -> spec_mod.ProcessSpec:
    rec = store.load(args.id)
    base = spec_mod.load(Path(rec.bundle)).process
    uid, gid = (base.uid, base.gid) if base else (0, 0)
    if args.user:
        u, _, g = args.user.partition(":")
        try:
            uid, gid = int(u), int(g) if g else gid
        except ValueError:
            raise EvmmError(f"--user {args.user!r}: give UID[:GID] as numbers") from None
    return spec_mod.ProcessSpec(
        args=tuple(args.command),
        env=(*(base.env if base else ()), *args.env),
        cwd=args.cwd or (base.cwd if base else "/"),
        uid=uid,
        gid=gid,
        additional_gids=tuple(args.additional_gids),
        terminal=bool(args.tty),
    )


def cmd_ps(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    _load_running(store, args.id, "list the processes of")
    answer = _call(store, args.id, "ps")
    pids = list(answer["pids"]) if isinstance(answer, dict) else []
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    ps_args = args.ps_args or ["-f"]
    r = subprocess.run(["ps", *ps_args, "-p", ",".join(map(str, pids))], capture_output=True, text=True)
    sys.stdout.write(r.stdout)
    return 0


def cmd_pause(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    _load_running(store, args.id, "pause")
    _call(store, args.id, "pause")
    return 0


def cmd_resume(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    _load_running(store, args.id, "resume")
    _call(store, args.id, "resume")
    return 0


def cmd_features(args: argparse.Namespace, store: Store, log: RuntimeLog) -> int:
    print(json.dumps(features.features(), indent=2))
    return 0


# ---- the parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evmm-oci",
        description="An OCI runtime (runc's command line) running each container in a microVM.",
    )
    p.add_argument("--version", "-v", action="store_true", help="print the version")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--log", help="log file (default: errors to stderr only)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--debug", action="store_true", help="debug messages in the log")
    p.add_argument("--systemd-cgroup", action="store_true", help="cgroupsPath is slice:prefix:name")
    p.add_argument("--kernel", help="the guests' kernel (default: evmm's default guest; io.evmm.oci.kernel)")
    p.add_argument("--initrd", help="the guests' initramfs, with evmm-agent in it (io.evmm.oci.initrd)")
    p.add_argument(
        "--rootless", default="false", help="accepted for runc compatibility; evmm-oci runs as root"
    )
    p.add_argument("--criu", help="accepted for runc compatibility; checkpointing is not supported")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: object, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.set_defaults(func=func)
        return c

    def create_options(c: argparse.ArgumentParser) -> None:
        c.add_argument("--bundle", "-b", default=".", help="the bundle directory (config.json, rootfs)")
        c.add_argument("--console-socket", help="Unix socket to send the pty master to (process.terminal)")
        c.add_argument("--pid-file", help="write the container monitor's pid here")
        c.add_argument("--no-pivot", action="store_true", help="accepted (the guest root is the container's)")
        c.add_argument(
            "--no-new-keyring", action="store_true", help="accepted (the guest has its own keyrings)"
        )
        c.add_argument("--preserve-fds", type=int, default=0, help="only 0 is supported")
        c.add_argument("id")

    create_options(
        command("create", cmd_create, "create a container (its VM booted, its process not started)")
    )
    run = command("run", cmd_run, "create and start a container, and wait for it")
    create_options(run)
    run.add_argument("--detach", "-d", action="store_true")
    command("start", cmd_start, "start a created container's process").add_argument("id")
    command("state", cmd_state, "print a container's state (OCI runtime spec JSON)").add_argument("id")
    kill = command("kill", cmd_kill, "send a signal to the container's process")
    kill.add_argument("--all", "-a", action="store_true", help="to every process of the container")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="SIGTERM")
    delete = command("delete", cmd_delete, "delete a stopped container (--force: any)")
    delete.add_argument("--force", "-f", action="store_true")
    delete.add_argument("id")
    ex = command("exec", cmd_exec, "run a process in a running container")
    ex.add_argument("--process", "-p", help="an OCI process JSON file")
    ex.add_argument("--detach", "-d", action="store_true")
    ex.add_argument("--pid-file")
    ex.add_argument("--console-socket")
    ex.add_argument("--tty", "-t", action="store_true")
    ex.add_argument("--cwd")
    ex.add_argument("--env", "-e", action="append", default=[])
    ex.add_argument("--user", "-u")
    ex.add_argument("--additional-gids", "-g", type=int, action="append", default=[])
    ex.add_argument("--preserve-fds", type=int, default=0)
    ex.add_argument("id")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ps = command("ps", cmd_ps, "list the host processes standing for the container's processes")
    ps.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ps.add_argument("id")
    ps.add_argument("ps_args", nargs=argparse.REMAINDER)
    command("pause", cmd_pause, "pause the container's VM").add_argument("id")
    command("resume", cmd_resume, "resume the container's VM").add_argument("id")
    command("features", cmd_features, "print what this runtime supports (runtime spec features.md)")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evmm")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"evmm-oci version {_version()}\nspec: {OCI_VERSION}")
        return 0
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    log = RuntimeLog(args.log, args.log_format, args.debug)
    try:
        if getattr(args, "preserve_fds", 0):
            raise EvmmError("--preserve-fds is not supported: a VM cannot take the caller's file descriptors")
        return int(args.func(args, Store(Path(args.root)), log))
    except EvmmError as e:
        log.error(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        log.close()
