"""A scratch directory in the cache where Debian packages are unpacked while an asset is built."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from evmm.assets import debian

Step = Callable[[str], None]  # told what the build is doing now, for a progress display


def no_progress(_message: str) -> None:
    pass


class Workspace:
    """``with Workspace(cache) as ws``: downloads go to ``cache/debs``; unpacked trees vanish on exit."""

    def __init__(self, cache: Path, step: Step = no_progress, refresh: bool = False) -> None:
        self.cache = cache
        self.debs = cache / "debs"
        self.step = step
        self.refresh = refresh
        self._refreshed: set[str] = set()
        self.scratch = Path()

    def __enter__(self) -> Workspace:
        self.cache.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="build-", dir=self.cache))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def fetch(self, packages: list[str], into: str) -> Path:
        """Download ``packages`` (cached .debs are reused unless refreshing) and unpack them all into one tree."""
        if self.refresh:
            # --force: fetch again what this build asks for (a newer kernel ABI, a security update).
            for p in packages:
                if p not in self._refreshed:
                    for old in self.debs.glob(f"{p}_*.deb"):
                        old.unlink()
                    self._refreshed.add(p)
        shown = ", ".join(packages[:3]) + (f" and {len(packages) - 3} more" if len(packages) > 3 else "")
        self.step(f"downloading {shown}")
        debs = debian.download(packages, self.debs)
        root = self.scratch / into
        self.step(f"unpacking {shown}")
        for deb in debs:
            debian.unpack(deb, root)
        return root

    def fetch_kernel(self, metapackage: str, prefix: str) -> tuple[Path, str]:
        """The kernel a metapackage points to, unpacked, with modules.dep written: (root, version)."""
        self.step(f"resolving {metapackage}")
        package = debian.resolve_metapackage(metapackage, prefix)
        root = self.fetch([package], into=package)
        version = debian.kernel_version(root)
        self.step(f"depmod {version}")
        debian.depmod(root, version)
        return root, version

    def fetch_busybox(self) -> Path:
        return self.fetch(["busybox-static"], into="busybox") / "bin" / "busybox"
