"""``evmm run``: boot a Linux guest with the terminal (or pipes) as its serial console."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from evmm import exitcodes
from evmm.config.devspec import (
    FsSpec,
    parse_drive,
    parse_fs,
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

if TYPE_CHECKING:
    from evmm.loop.console import ConsoleIO
    from evmm.machine.machine import Machine
    from evmm.snapshot.config import Overrides

TESTHOST_HINT = "evmm testhost run -- evmm run ..."


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="boot a Linux guest on the terminal",
        description="Boot a Linux kernel (bzImage or ELF vmlinux) with an initramfs. The serial console is "
        "this terminal (raw mode; Ctrl-] q quits) or stdin/stdout when they are pipes. Exit status: 0 guest "
        "poweroff, 1 error, 3 guest reboot, 4 triple fault, 5 KVM error, 6 guest panic, 159 seccomp violation, "
        "130/143 signal.",
    )
    p.add_argument("--kernel", type=Path, help="kernel image (default: the guest built by `evmm assets`)")
    p.add_argument("--initrd", type=Path, help="initramfs (default: evmm's, with the default kernel)")
    p.add_argument("--append", default="", metavar="STR", help="kernel command line (added to the defaults)")
    p.add_argument("--memory", metavar="SIZE", help="guest RAM, e.g. 256M or 2G (default 256M)")
    p.add_argument("--cpus", metavar="N", help="number of vCPUs (default 1)")
    p.add_argument(
        "--restore",
        type=Path,
        metavar="DIR",
        help="resume the VM saved in snapshot DIR instead of booting (--drive, --net, --vsock and "
        "--virtio-console give its host resources again; docs/snapshot.md)",
    )
    p.add_argument(
        "--machine",
        choices=("microvm", "standard"),
        default="microvm",
        help="the board: microvm (virtio-mmio, no PCI; the default) or standard (PCI, virtio-pci, hotplug)",
    )
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
        "--fs",
        action="append",
        default=[],
        metavar="path=DIR,tag=TAG[,readonly=on][,cache=none|auto|always]",
        help="share a host directory (virtio-fs; in the guest: mount -t virtiofs TAG /mnt) (repeatable)",
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
        "--seccomp",
        choices=("kill", "log", "off"),
        default=os.environ.get("EVMM_SECCOMP", "kill"),
        help="per-thread seccomp filters: kill (the default, or $EVMM_SECCOMP: a forbidden system call "
        "stops evmm, exit 159), log (allow it, the kernel logs it), off",
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


def _fss(texts: list[str]) -> tuple[FsSpec, ...]:
    fss = tuple(parse_fs(t) for t in texts)
    tags = [fs.tag for fs in fss]
    for tag in tags:
        if tags.count(tag) > 1:
            raise ConfigError(f"--fs: tag={tag!r} is given to two directories; the guest mounts by tag")
    return fss


def config_from_args(args: argparse.Namespace) -> MachineConfig:
    memory = check_memory(parse_size(args.memory or "256M"))
    cpus = _cpus(args.cpus or "1")
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
        board=args.machine,
        drives=tuple(parse_drive(d) for d in args.drive),
        nets=tuple(parse_net(n) for n in args.net),
        vsock=parse_vsock(args.vsock) if args.vsock is not None else None,
        console=parse_virtio_console(args.virtio_console) if args.virtio_console is not None else None,
        rng=parse_rng(args.rng) if args.rng is not None else None,
        fss=_fss(args.fs),
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
    if config.fss:
        from evmm.devices.virtio.fs import make_fs

        for fs in config.fss:
            make_fs(fs).close()


def run(args: argparse.Namespace) -> int:
    if args.seccomp not in ("kill", "log", "off"):  # argparse checks a given value, not the default
        raise ConfigError(f"EVMM_SECCOMP={args.seccomp!r}: not kill, log or off")
    if args.restore is not None:
        return _restore(args)
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
    return run_machine(
        config, verbose=args.verbose, api_sock=args.api_sock, qmp=args.qmp, seccomp=args.seccomp, laps=laps
    )


def _restore(args: argparse.Namespace) -> int:
    """``evmm run --restore DIR``: the snapshot's machine, its host resources given again where asked."""
    from evmm.snapshot.restore import load_snapshot, restore_machine

    fixed = [
        name
        for name, value in (
            ("--kernel", args.kernel),
            ("--initrd", args.initrd),
            ("--append", args.append or None),
            ("--memory", args.memory),
            ("--cpus", args.cpus),
            ("--hotplug", args.hotplug),
            ("--rng", args.rng),
            ("--virtio-mmio-cmdline", args.virtio_mmio_cmdline),
        )
        if value is not None
    ]
    if fixed:
        raise ConfigError(f"{fixed[0]} cannot change a snapshot's machine (--restore {args.restore})")
    snap = load_snapshot(args.restore, overrides_from_args(args))
    host = probe()
    if not host.present:
        raise EvmmError(host.reason)
    if not host.can_boot_linux and not args.allow_slow_kvm:
        raise EvmmError(f"{host.reason}; restore it in the KVM test host instead: {TESTHOST_HINT}")
    if args.qmp is not None:
        from evmm.control import parse_qmp_spec

        parse_qmp_spec(args.qmp)
    return run_machine(
        snap.config,
        verbose=args.verbose,
        api_sock=args.api_sock,
        qmp=args.qmp,
        seccomp=args.seccomp,
        build=lambda config, loop, console, stdio: restore_machine(snap, loop, console, stdio=stdio),
    )


def overrides_from_args(args: argparse.Namespace) -> Overrides:
    from evmm.snapshot.config import Overrides

    return Overrides(
        drives=tuple(parse_drive(d) for d in args.drive) or None,
        nets=tuple(parse_net(n) for n in args.net) or None,
        vsock=parse_vsock(args.vsock) if args.vsock is not None else None,
        console=parse_virtio_console(args.virtio_console) if args.virtio_console is not None else None,
    )


Builder = Callable[
    [MachineConfig, asyncio.AbstractEventLoop, "ConsoleIO | None", "tuple[int, int] | None"], "Machine"
]


def run_machine(
    config: MachineConfig,
    *,
    verbose: bool = False,
    api_sock: Path | None = None,
    qmp: str | None = None,
    seccomp: str = "kill",
    build: Builder | None = None,
    laps: Laps | None = None,
) -> int:
    """Build the machine (``build``: restore it instead), serve its console and control channels, run it
    until it stops; the exit code.  ``laps``: the start-up so far, which the build goes on timing (-v)."""
    laps = laps if laps is not None else Laps()
    import uvloop

    from evmm.confine import seccomp as confine
    from evmm.control import Commands, start_control
    from evmm.control.prompt import CommandsTarget, EscapeMenu, fd_writer
    from evmm.log import set_raw_terminal
    from evmm.log import setup as log_setup
    from evmm.loop.console import ConsoleIO
    from evmm.loop.terminal import RawTerminal
    from evmm.loop.vcpu_thread import KICK_SIGNAL
    from evmm.machine.microvm import build_microvm
    from evmm.snapshot import commands as snapshot_commands

    if build is None:

        def build(
            config: MachineConfig,
            loop: asyncio.AbstractEventLoop,
            console: ConsoleIO | None,
            stdio: tuple[int, int] | None,
        ) -> Machine:
            if config.board == "standard":
                # Not imported for a microvm: the PCI devices, their ACPI and uuid are 0.4 MiB of a VMM.
                from evmm.machine.standard import build_standard

                return build_standard(config, loop, console, stdio=stdio, laps=laps)
            return build_microvm(config, loop, console, stdio=stdio, laps=laps)

    laps.lap("imports")
    # The kick signal must have a handler (any) so that it interrupts KVM_RUN instead of killing the process.
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    # SIGUSR2 prints every thread's Python stack to stderr and the VM goes on: where a VM that has gone
    # silent is stuck (the linux tier's harness asks for it when a guest times out).
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    # Filters compiled now, before the loop exists (it must not get an io_uring); each thread puts its own
    # on as it starts (evmm.confine.thread).
    confinement = confine.enable(confine.Mode(seccomp), confine.features(config))
    laps.lap("seccomp")
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
    try:
        with RawTerminal(in_fd if interactive and in_fd is not None else -1) as term:
            set_raw_terminal(term.active)
            if hvc_stdio:
                # The virtio console owns the terminal; the UART's output is dropped.
                stdio = (in_fd if in_fd is not None else os.open(os.devnull, os.O_RDONLY), out_fd)
                machine = build(config, loop, None, stdio)
            else:
                console = ConsoleIO(
                    loop, out_fd, in_fd, interactive=term.active, on_escape=lambda key: menu[0].on_escape(key)
                )
                machine = build(config, loop, console, None)
            m = machine
            commands = Commands(m)
            snapshot_commands.register(commands, lambda: m)
            if config.board == "standard":
                from evmm.control.pci_commands import register_pci_commands

                register_pci_commands(commands)
            menu.append(
                EscapeMenu(
                    CommandsTarget(commands), fd_writer(out_fd), send=console.inject if console else None
                )
            )
            if os.environ.get("EVMM_TEST_HOOKS") == "1":
                from evmm.confine.testhook import test_commands

                for command in test_commands(confinement is not None):
                    commands.register(command)
            close_control = loop.run_until_complete(
                start_control(m, console, api_sock=api_sock, qmp=qmp, commands=commands)
            )
            if confinement is not None:
                # What the control methods and the escape menu import on first use, imported now: after the
                # main filter a first import would list a directory (evmm.confine.preload).
                from evmm.confine.preload import preload

                preload(m, control=api_sock is not None or qmp is not None, interactive=term.active)
                # The main thread's filter goes on as the machine starts its vCPUs, before the reactor
                # serves a single exit (the vCPU threads, started unfiltered, put on their own first).
                m.subscribe(confine.main_on_start(m))
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
