"""evmm-agent, the in-guest agent: its C sources (package data here) and their build.

The guest binary is static (``gcc -static``), so it runs in any Linux guest with nothing else installed;
``evmm assets`` builds it with the host's gcc into the cache and puts it into the default initramfs at
``/sbin/evmm-agent``.  Tests build a second variant for the host, with AddressSanitizer and UBSan, to run the
same code against hostile frames (docs/agent-protocol.md, "Building").
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

from evmm.assets.cache import cache_root
from evmm.assets.cc import compile_c

SOURCES = ("main.c", "mpack.c", "params.c", "spec.c", "child.c", "proc.c", "files.c", "house.c")
HEADERS = ("agent.h", "mpack.h")
CODEC_TEST = ("codec_test.c", "mpack.c")
SERVICE = "evmm-agent.service"
GUEST_PATH = "/sbin/evmm-agent"
DEFAULT_PORT = 1024

_COMMON = ("-std=gnu11", "-Wall", "-Wextra", "-Wformat=2", "-Wshadow")
VARIANTS: dict[str, tuple[str, ...]] = {
    "guest": (*_COMMON, "-static", "-O2", "-s"),
    # The host test build: every out-of-bounds access or undefined operation aborts the agent loudly.
    "sanitized": (*_COMMON, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
}


def source(name: str) -> bytes:
    return resources.files("evmm.agent").joinpath(name).read_bytes()


def digest(variant: str, sources: tuple[str, ...] = SOURCES) -> str:
    """What a build depends on: the sources, the headers and the flags."""
    h = hashlib.sha256()
    for name in (*sources, *HEADERS):
        h.update(name.encode() + b"\0" + source(name))
    h.update(repr(VARIANTS[variant]).encode())
    return h.hexdigest()[:16]


def _compile(out: Path, variant: str, sources: tuple[str, ...]) -> None:
    files = {name: source(name) for name in (*sources, *HEADERS)}
    binary = compile_c(f"evmm-agent ({variant})", files, sources, VARIANTS[variant])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}")
    tmp_out.write_bytes(binary)
    tmp_out.chmod(0o755)
    os.replace(tmp_out, out)


def build(cache: Path | None = None, *, variant: str = "guest", program: str = "evmm-agent") -> Path:
    """The built binary in the cache (``agent/DIGEST-VARIANT/PROGRAM``), compiled when missing.

    ``program`` ``evmm-agent`` is the agent; ``codec-test`` the msgpack codec alone, for the fuzz tests.
    """
    sources = SOURCES if program == "evmm-agent" else CODEC_TEST
    out = cache_root(cache) / "agent" / f"{digest(variant, sources)}-{variant}" / program
    if not out.is_file():
        _compile(out, variant, sources)
    return out


__all__ = ["DEFAULT_PORT", "GUEST_PATH", "SERVICE", "build", "digest", "source"]
