"""The compiled cffi module and the one place ioctl results become exceptions."""

from __future__ import annotations

import os
from typing import Any

from evmm.errors import KvmError

try:
    from evmm.kvm._kvm_ffi import ffi, lib
except ImportError as e:  # pragma: no cover - only on a broken install
    raise KvmError(
        "evmm's KVM bindings are not compiled: reinstall with `pip install -e .` (needs gcc and linux-libc-dev)"
    ) from e

__all__ = ["check", "ffi", "ioctl", "ioctl_val", "lib"]


def check(ret: int, what: str) -> int:
    """Turn a ``-errno`` result from the C helpers into a ``KvmError`` naming the operation."""
    if ret < 0:
        raise KvmError(f"{what} failed: {os.strerror(-ret)}")
    return ret


def ioctl(fd: int, request: int, arg: Any, what: str) -> int:
    return check(lib.evmm_ioctl(fd, request, arg), what)


def ioctl_val(fd: int, request: int, arg: int, what: str) -> int:
    return check(lib.evmm_ioctl_val(fd, request, arg), what)
