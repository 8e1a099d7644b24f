"""asyncio and uvloop without OpenSSL: evmm opens no TLS connection, and libssl with libcrypto cost a VMM 4 MiB.

asyncio imports ``ssl`` when it can and runs without it when the import fails (``ssl = None``: a TLS request
is then refused).  uvloop imports ``ssl`` unconditionally and reads a few of its names once, at import
(``uvloop/includes/stdlib.pxi``).  ``import_without_ssl`` imports asyncio with ``ssl`` unimportable, then
uvloop against a stand-in that holds only those names and refuses to build a TLS context; afterwards
``import ssl`` finds the real module again, for any other user in the process.  The loops refuse TLS:
asyncio's as it does where Python has no ``ssl``, uvloop's with ``TlsUnavailable``.
"""

from __future__ import annotations

import sys
import types

# The names uvloop (0.23) reads from ``ssl`` at import (includes/stdlib.pxi), and nothing else.
_ERRORS = ("SSLError", "SSLWantReadError", "SSLSyscallError", "SSLZeroReturnError", "CertificateError")
# OpenSSL's SSL_ERROR_* codes (include/openssl/ssl.h), which uvloop keeps as C ints.
_CODES = {"SSL_ERROR_WANT_READ": 2, "SSL_ERROR_WANT_WRITE": 3, "SSL_ERROR_SYSCALL": 5}


class TlsUnavailable(RuntimeError):
    pass


def _refuse(*args: object, **kwargs: object) -> None:
    raise TlsUnavailable("evmm loaded its event loop without OpenSSL: TLS is not available in this process")


class _Refused:
    def __init__(self, *args: object, **kwargs: object) -> None:
        _refuse()


def _standin() -> types.ModuleType:
    ssl = types.ModuleType("ssl", "evmm's stand-in for uvloop's import: no TLS (evmm/loop/nossl.py)")
    ssl.SSLContext = type("SSLContext", (_Refused,), {})  # type: ignore[attr-defined]
    ssl.MemoryBIO = type("MemoryBIO", (_Refused,), {})  # type: ignore[attr-defined]
    ssl.create_default_context = _refuse  # type: ignore[attr-defined]
    base = type("SSLError", (OSError,), {})
    ssl.SSLError = base  # type: ignore[attr-defined]
    for name in _ERRORS[1:]:
        setattr(ssl, name, type(name, (base,), {}))
    for name, code in _CODES.items():
        setattr(ssl, name, code)
    return ssl


def import_without_ssl() -> bool:
    """Import asyncio and uvloop without OpenSSL; False where any of them is loaded already (nothing done), or
    where this uvloop needs more of ssl than the stand-in offers (then loaded with the real one)."""
    if any(name in sys.modules for name in ("ssl", "asyncio", "uvloop")):
        return False
    sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl raises ImportError (the import system's rule)
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    sys.modules["ssl"] = _standin()
    try:
        import uvloop
    except (AttributeError, ImportError):
        # A uvloop that reads more of ssl at import than the stand-in holds (pyproject allows >= 0.19): load
        # it with the real ssl, costing the 4 MiB, rather than not at all.
        for name in [m for m in sys.modules if m == "uvloop" or m.startswith("uvloop.")]:
            del sys.modules[name]
        del sys.modules["ssl"]
        import uvloop  # noqa: F401

        return False
    del sys.modules["ssl"]
    return True


__all__ = ["TlsUnavailable", "import_without_ssl"]
