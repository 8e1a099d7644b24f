"""The errors evmm reports to its users.

Every error a user can cause (a bad path, a bad size, a host without a needed KVM feature) is an ``EvmmError``
whose message is one line that names the input and says what to do; the CLI prints it as ``evmm: <message>``
and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class EvmmError(Exception):
    """An error with a one-line, user-facing message."""


class ConfigError(EvmmError):
    """A bad command-line value or machine configuration."""


class KvmError(EvmmError):
    """/dev/kvm is missing, lacks a capability, or an ioctl failed."""


class BootError(EvmmError):
    """A kernel or initrd image that cannot be loaded."""


class GuestMemoryError(EvmmError):
    """A guest-physical access outside guest RAM (often a hostile or buggy guest)."""
