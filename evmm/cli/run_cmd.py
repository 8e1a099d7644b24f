"""``evmm run``: boot a Linux guest with the terminal (or pipes) as its serial console."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import signal
import sys
from pathlib import Path

from evmm import exitcodes
from evmm.config.devspec import (
    parse_drive,
    parse_hotplug,
    parse_net,
    parse_rng,
    parse_virtio_console,
    parse_vsock,
)
from evmm.errors import ConfigError, EvmmError
from evmm.hostkvm import probe
from evmm.machine.config import MachineConfig, check_cpus, check_file, check_memory, parse_size
from evmm.startup import Laps

TESTHOST_HINT = "evmm testhost run -- evmm run ..."


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="boot a Linux guest on the terminal",
        description="Boot a Linux kernel (bzImage or ELF vmlinux) with an initramfs. The serial console is "
        "this terminal (raw mode; Ctrl-] q quits) or stdin/stdout when they are pipes. Exit status: 0 guest "
        "poweroff, 1 error, 3 guest reboot, 4 triple fault, 5 KVM error, 6 guest panic, 130/143 signal.",
    )
    p.add_argument("--kernel", type=Path, help="kernel image (default: the guest built by `evmm assets`)")
    p.add_argument("--initrd", type=Path, help="initramfs (default: evmm's, with the default kernel)")
    p.add_argument("--append", default="", metavar="STR", help="kernel command line (added to the defaults)")
    p.add_argument(
        "--memory", default="256M", metavar="SIZE", help="guest RAM, e.g. 256M or 2G (default 256M)"
    )
    p.add_argument("--cpus", default="1", metavar="N", help="number of vCPUs (default 1)")
    p.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="path=P[,readonly=on][,id=ID]",
        help="a virtio-blk disk (repeatable)",
    )
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap=NAME[,mac=M][,vhost=on|off]",
        help="a virtio-net NIC on a tap (repeatable); vhost-net where /dev/vhost-net opens, unless vhost=off",
    )
    p.add_argument(
        "--vsock",
        metavar="cid=N,path=SOCK|vhost=on",
        help="virtio-vsock; host side: the Unix socket SOCK, or the kernel's /dev/vhost-vsock (AF_VSOCK)",
    )
    p.add_argument("--virtio-console", metavar="PATH|stdio|pty", help="virtio-console (hvc0) endpoint")
    p.add_argument(
        "--rng",
        nargs="?",
        const="on",
        metavar="rate=BYTES_PER_S",
        help="virtio-rng from the host's getrandom",
    )
    p.add_argument(
        "--hotplug",
        metavar="blk=N,net=M[,vhost=on|off]",
        help="reserve empty hot-replace slots (filled via the control channel)",
    )
    p.add_argument(
        "--api-sock", type=Path, metavar="PATH", help="serve the msgpack control channel on this Unix socket"
    )
    p.add_argument(
        "--qmp", metavar="unix:PATH,server,nowait", help="serve QMP (QEMU's control protocol) on this socket"
    )
    p.add_argument(
        "--virtio-mmio-cmdline",
        action="store_true",
        default=None,
        help="also list virtio-mmio devices as virtio_mmio.device= (for kernels built to read it; default only with acpi=off)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log device activity and boot timing to stderr"
    )
    p.add_argument(
        "--allow-slow-kvm",
        action="store_true",
        help="boot even where /dev/kvm cannot run guest kernels at speed (PVM)",
    )
    p.set_defaults(func=run)


def _cpus(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"--cpus {text!r} is not a number") from None
    return check_cpus(n)


def config_from_args(args: argparse.Namespace) -> MachineConfig:
    memory = check_memory(parse_size(args.memory))
    cpus = _cpus(args.cpus)
    kernel: Path | None = args.kernel
    initrd: Path | None = args.initrd
    if kernel is None:
        from evmm.assets import default_guest

        guest = default_guest()
        kernel = guest.vmlinux if guest.vmlinux.exists() else guest.bzimage
        if initrd is None:
            initrd = guest.initramfs
    check_file(kernel, "--kernel")
    if initrd is not None:
        check_file(initrd, "--initrd")
    hotplug = parse_hotplug(args.hotplug) if args.hotplug is not None else (0, 0, None)
    return MachineConfig(
        kernel=kernel,
        initrd=initrd,
        cmdline=args.append,
        memory=memory,
        cpus=cpus,
        drives=tuple(parse_drive(d) for d in args.drive),
        nets=tuple(parse_net(n) for n in args.net),
        vsock=parse_vsock(args.vsock) if args.vsock is not None else None,
        console=parse_virtio_console(args.virtio_console) if args.virtio_console is not None else None,
        rng=parse_rng(args.rng) if args.rng is not None else None,
        virtio_cmdline=args.virtio_mmio_cmdline,
        hotplug_blk=hotplug[0],
        hotplug_net=hotplug[1],
        hotplug_vhost=hotplug[2],
    )


def preflight(config: MachineConfig) -> None:
    """Reject bad images before refusing the host: a user's typo is worth more than a KVM lecture."""
    from evmm.arch.x86.loader import parse_kernel, read_image
    from evmm.devices.virtio.blk.backend import FileBackend

    parse_kernel(read_image(config.kernel, "--kernel"), f"--kernel {config.kernel}")
    for drive in config.drives:
        FileBackend.open(drive.path, drive.readonly).close()


def run(args: argparse.Namespace) -> int:
    laps = Laps()
    laps.lap("cli")  # the interpreter's start to here: evmm.cli.main's imports, this module's, argparse
    config = config_from_args(args)
    laps.lap("config")
    host = probe()
    if not host.present or (not host.can_boot_linux and not args.allow_slow_kvm):
        # Where the VM will be built, the builder checks these anyway (at no extra cost).
        preflight(config)
    if not host.present:
        raise EvmmError(host.reason)
    if not host.can_boot_linux and not args.allow_slow_kvm:
        raise EvmmError(f"{host.reason}; boot it in the KVM test host instead: {TESTHOST_HINT}")
    if args.qmp is not None:
        from evmm.control import parse_qmp_spec

        parse_qmp_spec(args.qmp)  # a bad spec is a usage error before anything starts
    laps.lap("probe")
    return run_machine(config, verbose=args.verbose, api_sock=args.api_sock, qmp=args.qmp, laps=laps)


def run_machine(
    config: MachineConfig,
    *,
    verbose: bool = False,
    api_sock: Path | None = None,
    qmp: str | None = None,
    laps: Laps | None = None,
) -> int:
    """Build the machine, serve its console and control channels, run it until it stops; the exit code."""
    laps = laps if laps is not None else Laps()
    import uvloop

    from evmm.control import Commands, start_control
    from evmm.control.prompt import CommandsTarget, EscapeMenu, fd_writer
    from evmm.log import set_raw_terminal
    from evmm.log import setup as log_setup
    from evmm.loop.console import ConsoleIO
    from evmm.loop.terminal import RawTerminal
    from evmm.loop.vcpu_thread import KICK_SIGNAL
    from evmm.machine.machine import Machine
    from evmm.machine.microvm import build_microvm

    # The kick signal must have a handler (any) so that it interrupts KVM_RUN instead of killing the process.
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    # SIGUSR2 prints every thread's Python stack to stderr and the VM goes on: where a VM that has gone
    # silent is stuck (the linux tier's harness asks for it when a guest times out).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    in_fd = sys.stdin.fileno() if sys.stdin is not None else None
    out_fd = sys.stdout.fileno()
    interactive = in_fd is not None and os.isatty(in_fd)
    machine: Machine | None = None
    console: ConsoleIO | None = None
    menu: list[EscapeMenu] = []
    close_control = None
    hvc_stdio = config.console is not None and config.console.kind == "stdio"
    log_setup(verbose)
    laps.lap("imports")
    try:
        with RawTerminal(in_fd if interactive and in_fd is not None else -1) as term:
            set_raw_terminal(term.active)
            if hvc_stdio:
                # The virtio console owns the terminal; the UART's output is dropped.
                stdio = (in_fd if in_fd is not None else os.open(os.devnull, os.O_RDONLY), out_fd)
                machine = build_microvm(config, loop, None, stdio=stdio, laps=laps)
            else:
                console = ConsoleIO(
                    loop, out_fd, in_fd, interactive=term.active, on_escape=lambda key: menu[0].on_escape(key)
                )
                machine = build_microvm(config, loop, console, laps=laps)
            m = machine
            commands = Commands(m)
            menu.append(
                EscapeMenu(
                    CommandsTarget(commands), fd_writer(out_fd), send=console.inject if console else None
                )
            )
            close_control = loop.run_until_complete(
                start_control(m, console, api_sock=api_sock, qmp=qmp, commands=commands)
            )
            loop.add_signal_handler(signal.SIGINT, m.stop, exitcodes.EXIT_SIGINT, "interrupted (SIGINT)")
            loop.add_signal_handler(signal.SIGTERM, m.stop, exitcodes.EXIT_SIGTERM, "terminated (SIGTERM)")
            loop.add_signal_handler(signal.SIGHUP, m.stop, exitcodes.EXIT_SIGTERM, "hung up (SIGHUP)")
            hvc = m.virtio_console()
            if hvc is not None and hvc_stdio and interactive:
                # The terminal is hvc0's: its size follows the window (virtio 1.2 §5.3.6, F_SIZE).  The serial
                # console has no way to tell a guest its size (there, `stty rows R cols C` in the guest).
                loop.add_signal_handler(signal.SIGWINCH, hvc.follow_endpoint_size)
            laps.lap("control")
            result = loop.run_until_complete(m.run())
            loop.run_until_complete(close_control())
            close_control = None
            stuck = m.close()
            machine = None
            if console is not None:
                console.close()
                console = None
    finally:
        if close_control is not None:
            loop.run_until_complete(close_control())
        if machine is not None:
            machine.stop(exitcodes.EXIT_VMM_FAULT, "evmm failed")
            machine.close()
        if console is not None:
            console.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        loop.close()
    if stuck:
        print(f"evmm: {', '.join(stuck)} did not stop", file=sys.stderr)
    if result.code != exitcodes.EXIT_GUEST_POWEROFF:
        print(f"evmm: {result.message}", file=sys.stderr)
    return result.code
