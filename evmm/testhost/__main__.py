"""``python -m evmm.testhost run ...``: the same as ``evmm testhost run``, without loading evmm's other commands.

The test tiers start the test host this way, so that a half-built command elsewhere in evmm cannot stop them.
"""

from __future__ import annotations

import argparse
import sys

from evmm.cli import testhost_cmd
from evmm.errors import EvmmError


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m evmm.testhost")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    testhost_cmd.register(sub)
    args = parser.parse_args(["testhost", *sys.argv[1:]])
    try:
        return int(args.func(args))
    except EvmmError as e:
        print(f"evmm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
