"""Where evmm keeps what it builds: ``~/.cache/evmm`` unless ``EVMM_CACHE`` or ``--cache`` says otherwise."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ENV_VAR = "EVMM_CACHE"


def cache_root(cache: Path | None = None) -> Path:
    """The cache directory: an explicit argument, else ``$EVMM_CACHE``, else ``~/.cache/evmm``."""
    if cache is not None:
        return cache.expanduser().absolute()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "evmm"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` so that a reader sees either the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: Path) -> dict[str, str] | None:
    """A manifest written by ``write_manifest``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return None
    return {str(k): v for k, v in data.items()}


def write_manifest(path: Path, entries: dict[str, str]) -> None:
    # Written last, after every file it names: its presence is what marks a build complete.
    write_atomic(path, (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode())
