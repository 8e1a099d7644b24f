"""``evmm serve --api-sock S``: a warm VMM, everything imported, that boots or restores a VM on request.

    evmm serve --api-sock /run/vm1.sock &
    evmm ctl /run/vm1.sock restore dir=/snapshots/base vsock="cid=7,path=/run/vm1.vsock"

The VM's serial console is this process's stdin and stdout, as with ``evmm run`` (and on the control socket:
``evmm console S``).  The process ends when its VM stops, with ``evmm run``'s exit status; a ``quit``
before any VM ends it with 0.  docs/snapshot.md has the methods.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from evmm import exitcodes
from evmm.errors import EvmmError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="a warm VMM that boots or restores a VM when asked (restore, boot)",
        description="Start a VMM with nothing to run yet, everything imported, and serve its control socket; "
        "the methods restore (a snapshot) and boot (a kernel) give it its one VM. The VM's console is this "
        "terminal (or stdin/stdout). Exits when the VM stops, with evmm run's exit status.",
    )
    p.add_argument("--api-sock", type=Path, required=True, metavar="PATH", help="the control socket")
    p.add_argument("-v", "--verbose", action="store_true", help="log device activity and timing to stderr")
    p.add_argument(
        "--allow-slow-kvm",
        action="store_true",
        help="serve even where /dev/kvm cannot run guest kernels at speed (PVM)",
    )
    p.set_defaults(func=run)


# What a boot or a restore would otherwise import on its way, all of it, whatever the VM will have.
WARM_MODULES = (
    "uvloop",
    "evmm.machine.microvm",
    "evmm.devices.virtio.blk",
    "evmm.devices.virtio.console",
    "evmm.devices.virtio.net",
    "evmm.devices.virtio.rng",
    "evmm.devices.virtio.vsock",
    "evmm.snapshot.restore",
    "evmm.snapshot.save",
)


def warm_up() -> None:
    from evmm.snapshot.devices import PERSIST_MODULES

    for module in (*WARM_MODULES, *PERSIST_MODULES.values()):
        importlib.import_module(module)


def run(args: argparse.Namespace) -> int:
    from evmm.hostkvm import probe

    host = probe()
    if not host.present:
        raise EvmmError(host.reason)
    if not host.can_boot_linux and not args.allow_slow_kvm:
        raise EvmmError(
            f"{host.reason}; serve in the KVM test host instead: evmm testhost run -- evmm serve ..."
        )
    warm_up()
    return serve(args.api_sock, verbose=args.verbose)


def serve(api_sock: Path, *, verbose: bool = False) -> int:
    import uvloop

    from evmm.control import Commands, start_control
    from evmm.log import set_raw_terminal
    from evmm.log import setup as log_setup
    from evmm.loop.console import ConsoleIO
    from evmm.loop.terminal import RawTerminal
    from evmm.loop.vcpu_thread import KICK_SIGNAL
    from evmm.snapshot import commands as snapshot_commands
    from evmm.snapshot import served as served_commands

    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    log_setup(verbose)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    in_fd = sys.stdin.fileno() if sys.stdin is not None else None
    out_fd = sys.stdout.fileno()
    interactive = in_fd is not None and os.isatty(in_fd)
    done: asyncio.Future[tuple[int, str]] = loop.create_future()

    def finish(code: int, message: str) -> None:
        if not done.done():
            done.set_result((code, message))

    with RawTerminal(in_fd if interactive and in_fd is not None else -1) as term:
        set_raw_terminal(term.active)
        console = ConsoleIO(loop, out_fd, in_fd, interactive=term.active)
        served = served_commands.ServedMachine(loop, finish)
        commands = Commands(served)
        snapshot_commands.register(commands, lambda: served.target)
        served_commands.register(commands, served, console)

        def stop(code: int, why: str) -> None:
            served.stop(code, why)

        close = loop.run_until_complete(
            start_control(served, console, api_sock=api_sock, qmp=None, commands=commands)
        )
        loop.add_signal_handler(signal.SIGINT, stop, exitcodes.EXIT_SIGINT, "interrupted (SIGINT)")
        loop.add_signal_handler(signal.SIGTERM, stop, exitcodes.EXIT_SIGTERM, "terminated (SIGTERM)")

        async def main() -> tuple[int, str]:
            either: list[asyncio.Future[Any]] = [done, served.ran]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if served.ran.done():
                return served.ran.result().code, served.ran.result().message
            return done.result()

        try:
            code, message = loop.run_until_complete(main())
        finally:
            loop.run_until_complete(close())
            stuck = served.target.close() if served.target is not None else []
            console.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            loop.close()
    if stuck:
        print(f"evmm: {', '.join(stuck)} did not stop", file=sys.stderr)
    if code != exitcodes.EXIT_GUEST_POWEROFF:
        print(f"evmm: {message}", file=sys.stderr)
    return code
