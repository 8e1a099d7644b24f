"""A package's names loaded from their modules on first use (PEP 562), so importing the package costs nothing.

    __getattr__ = lazy_names(__name__, {"Kvm": "evmm.kvm.system", ...})

The names stay importable from the package (``from evmm.kvm import Kvm``); the package imports them under
``TYPE_CHECKING`` too, for the type checker.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each lazy name to the module defining it."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    return __getattr__


__all__ = ["lazy_names"]
