"""``python -m tests.fuzz [--runs N] [--seed S] [TARGET...]``: run fuzz targets and print one line each (the
numbers docs/security.md quotes), then every distinct crash with its input and traceback."""

from __future__ import annotations

import argparse
import sys

from tests.fuzz.engine import fuzz
from tests.fuzz.targets import SEEDS, TARGETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10_000, help="inputs per target (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guided", type=int, default=20_000, help="inputs run with coverage tracing")
    p.add_argument("targets", nargs="*", help=f"default: all ({', '.join(TARGETS)})")
    args = p.parse_args(argv)
    crashed = False
    for name in args.targets or list(TARGETS):
        if name not in TARGETS:
            p.error(f"no fuzz target {name!r}")
        stats = fuzz(name, TARGETS[name], args.runs, seed=args.seed, seeds=SEEDS[name], guided=args.guided)
        print(stats.line(), flush=True)
        for crash in stats.crashes.values():
            crashed = True
            print(f"  crash x{crash.count}: {crash.signature}\n  input: {crash.data.hex()}\n{crash.trace}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
