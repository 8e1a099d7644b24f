"""evmm: a virtual machine monitor for Linux KVM, in Python.

``evmm.Sandbox`` (evmm/sandbox/) is imported on first use: every ``evmm`` command imports this package, and
``evmm run``'s start-up should not pay for the sandbox's modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evmm.sandbox import Sandbox as Sandbox

__all__ = ["Sandbox"]


def __getattr__(name: str) -> Any:
    if name == "Sandbox":
        from evmm.sandbox import Sandbox

        return Sandbox
    raise AttributeError(f"module 'evmm' has no attribute {name!r}")
