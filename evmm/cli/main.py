"""``evmm`` command line: one sub-command per module, as kvmtool keeps one builtin per file."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from evmm.errors import EvmmError

# Each module defines ``register(subparsers)``, which adds its sub-command and sets ``func`` (args -> exit code).
# Imported lazily so that ``evmm --help`` does not pay for uvloop or the KVM bindings.
COMMANDS = (
    "evmm.cli.run_cmd",
    "evmm.cli.doctor_cmd",
    "evmm.cli.assets_cmd",
    "evmm.cli.testhost_cmd",
    "evmm.cli.ctl_cmd",
    "evmm.cli.console_cmd",
    "evmm.cli.bench_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evmm", description="A virtual machine monitor for Linux KVM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a command still being built
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
