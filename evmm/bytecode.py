"""Bytecode for evmm's own sources, written ahead of time.

An editable install's sources have no ``.pyc`` until an import writes them, and no import writes any where
``PYTHONDONTWRITEBYTECODE`` is set (as on evmm's CI machines) or the tree is read-only (the KVM test host
mounts it read-only over 9p).  Python then compiles every evmm module at every ``evmm run``: measured here,
170 ms of a 420 ms start-up natively, and Python runs ~30x slower in the KVM test host.  ``compileall``
writes them whatever that setting says, and recompiles only what changed since.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def precompile(*dirs: Path) -> None:
    """Write missing or stale ``.pyc`` files under ``dirs`` (evmm's package and tests by default)."""
    for d in dirs or (REPO / "evmm", REPO / "tests"):
        if d.is_dir() and os.access(d, os.W_OK):  # an installed, read-only evmm was compiled by pip
            compileall.compile_dir(d, quiet=2)
