"""The per-thread seccomp hook, kept apart so that the threads' modules import nothing heavy.

``confine_thread(role)`` is the first call of every thread evmm starts (vCPU threads, I/O workers); it does
nothing until ``evmm run`` has switched confinement on (``evmm.confine.seccomp.enable``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from evmm.exitcodes import EXIT_SECCOMP

if TYPE_CHECKING:
    from evmm.confine.seccomp import Confinement

_active: Confinement | None = None


def set_active(confinement: Confinement | None) -> None:
    global _active
    _active = confinement


def active() -> Confinement | None:
    return _active


def confine_thread(role: str) -> None:
    """Put the calling thread under ``role``'s filter when confinement is on.

    A thread that cannot be confined must not go on to serve the guest unconfined, and this thread has no
    quicker way to stop the VM: the line goes to stderr and the process exits with ``EXIT_SECCOMP``.
    """
    confinement = _active
    if confinement is None:
        return
    from evmm.errors import EvmmError

    try:
        confinement.install(role)
    except EvmmError as e:
        os.write(2, f"evmm: {e}\n".encode())
        os._exit(EXIT_SECCOMP)
