"""Kernel modules in load order, from ``modules.dep`` (the file depmod writes; see depmod(8), modules.dep(5))."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import PurePosixPath

from evmm.errors import EvmmError


def module_name(path: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko`` -> ``virtio_rng`` (the kernel treats - and _ alike)."""
    name = PurePosixPath(path).name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``path: dep dep ...`` lines -> {path: [dependency paths]}, paths relative to lib/modules/VERSION."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def parse_builtin(text: str) -> set[str]:
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(
    deps: Mapping[str, list[str]],
    wanted: Iterable[str],
    builtin: AbstractSet[str] = frozenset(),
    what: str = "the kernel",
) -> list[str]:
    """The module files to insmod, dependencies first, each once, for the modules named in ``wanted``.

    Modules built into the kernel need no loading and are skipped; an unknown name is an error.
    """
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise EvmmError(f"{what}: modules.dep has a dependency cycle through {path}")
        visiting.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise EvmmError(f"{what} has no module {name} (neither in modules.dep nor built in)")
    return order
