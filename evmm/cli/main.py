"""``evmm`` command line: one sub-command per module, as kvmtool keeps one builtin per file."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import evmm.startup  # noqa: F401 - its clock marks main's start (evmm run -v times start-up)
from evmm.errors import EvmmError

# Each module defines ``register(subparsers)``, which adds its sub-command and sets ``func`` (args -> exit code).
# ``evmm NAME ...`` imports only NAME's module: the others' imports (rich, the control client, the benchmark)
# would cost ``evmm run`` tens of milliseconds of start-up before the guest runs.  Help lists them all.
COMMANDS = {
    "run": "evmm.cli.run_cmd",
    "jail": "evmm.cli.jail_cmd",
    "doctor": "evmm.cli.doctor_cmd",
    "assets": "evmm.cli.assets_cmd",
    "testhost": "evmm.cli.testhost_cmd",
    "ctl": "evmm.cli.ctl_cmd",
    "console": "evmm.cli.console_cmd",
    "bench": "evmm.cli.bench_cmd",
    "serve": "evmm.cli.serve_cmd",
    "clone": "evmm.cli.clone_cmd",
    "exec": "evmm.cli.exec_cmd",
    "cp": "evmm.cli.cp_cmd",
}
# The commands that run a VMM on uvloop: they load it without OpenSSL, before their modules import asyncio.
REACTOR_COMMANDS = ("run", "serve")


def _command(argv: Sequence[str] | None) -> str | None:
    return next((a for a in argv or () if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv`` naming a sub-command, one that knows only that sub-command."""
    parser = argparse.ArgumentParser(prog="evmm", description="A virtual machine monitor for Linux KVM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    first = _command(argv)
    names = [first] if first in COMMANDS else list(COMMANDS)
    for name in names:
        importlib.import_module(COMMANDS[name]).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if _command(argv) in REACTOR_COMMANDS:
        from evmm.loop.nossl import import_without_ssl

        import_without_ssl()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EvmmError as e:
        print(f"evmm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
