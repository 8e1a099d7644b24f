"""Static C programs for guests, built with the host's gcc: evmm-agent (evmm/agent) and the linux tier's
hostile virtio driver (assets/hostile.c).  ``-static``: they run in any Linux guest with nothing installed."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from evmm.errors import EvmmError


def compile_c(
    program: str, files: Mapping[str, bytes], sources: Sequence[str], flags: Sequence[str]
) -> bytes:
    """The executable gcc makes of ``sources`` (names in ``files``, which also holds their headers) with
    ``flags``; ``EvmmError`` naming ``program`` and gcc's last line when it fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise EvmmError(
            f"gcc is not installed: {program} is built from C with the host's gcc (apt-get install gcc)"
        )
    with tempfile.TemporaryDirectory(prefix=f"{program}-") as tmp:
        src = Path(tmp)
        for name, data in files.items():
            (src / name).write_bytes(data)
        built = src / "a.out"
        argv = [gcc, *flags, "-o", str(built), *(str(src / n) for n in sources)]
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no message"])[-1]
            hint = " (static linking needs libc6-dev)" if "-static" in flags and "-lc" in r.stderr else ""
            raise EvmmError(f"building {program} failed{hint}: {last}")
        return built.read_bytes()


__all__ = ["compile_c"]
