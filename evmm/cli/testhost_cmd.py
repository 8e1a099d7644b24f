"""``evmm testhost run``: run a command on a genuine KVM inside the KVM test host (see evmm/testhost)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evmm.errors import ConfigError


def _size_mib(text: str) -> int:
    units = {"": 1, "M": 1, "G": 1024}
    number, unit = text[:-1], text[-1:].upper()
    if unit.isdigit():
        number, unit = text, ""
    if unit not in units or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2048M or 2G")
    return int(number) * units[unit]


def _share(text: str) -> Path:
    path = Path(os.path.abspath(text))
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "testhost", help="run commands on a genuine KVM inside the KVM test host (QEMU TCG)"
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    run = verbs.add_parser(
        "run",
        help="run CMD inside the test host and exit with its status",
        description="Boot the KVM test host (host root shared read-only), run CMD there with a real /dev/kvm "
        "(kvm_amd), stream its output and exit with its status (124: timed out, 125: the test host failed).",
    )
    run.add_argument(
        "--share",
        action="append",
        type=_share,
        default=[],
        metavar="DIR",
        help="share DIR read-write at the same path inside (repeatable)",
    )
    run.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS", help="limit for CMD (1800)")
    run.add_argument(
        "--boot-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="limit for the test host to start CMD (120)",
    )
    run.add_argument("--memory", type=_size_mib, default=2048, metavar="SIZE", help="test host RAM (2048M)")
    run.add_argument("--cpus", type=int, default=2, metavar="N", help="test host vCPUs (2)")
    run.add_argument("--cache", type=Path, default=None, metavar="DIR", help="evmm cache (~/.cache/evmm)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `evmm --help` stays cheap.
    from evmm.assets.cache import cache_root
    from evmm.testhost.assets import testhost_assets
    from evmm.testhost.runner import RunConfig, Share, forwarded_env, run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("testhost run: no command given (usage: evmm testhost run [OPTIONS] -- CMD...)")
    if args.cpus < 1:
        raise ConfigError(f"testhost run: --cpus {args.cpus} must be at least 1")
    assets = testhost_assets(args.cache)
    config = RunConfig(
        command=command,
        kernel=assets.kernel,
        initramfs=assets.initramfs,
        cwd=Path(os.path.abspath(os.getcwd())),
        shares=[Share(p) for p in args.share],
        visible=[cache_root(args.cache)],
        env=forwarded_env(os.environ),
        memory_mib=args.memory,
        cpus=args.cpus,
        timeout=args.timeout,
        boot_timeout=args.boot_timeout,
        interactive=sys.stdin.isatty(),
    )
    sys.stdout.flush()
    return run(config)
