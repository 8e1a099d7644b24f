"""``evmm cp SRC DST``: copy files and directories between this host and a running VM's guest.

One side is ``SOCK:/path`` (SOCK is the VM's control socket, as for ``evmm exec``), the other a host path,
as ``docker cp CONTAINER:PATH``.  A copy onto an existing directory (or a path ending in ``/``) goes inside
it under the source's name.  Modes are kept; through the agent, every file is checked by length and CRC-32.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import posixpath
import stat
from pathlib import Path

from evmm.errors import EvmmError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cp",
        help="copy files between this host and a running VM's guest, as docker cp",
        description="Copy SRC to DST, one of them SOCK:/path in the guest of the VM whose control socket is "
        "SOCK (evmm run --api-sock SOCK --vsock ...). Directories are copied whole.",
    )
    p.add_argument("src", metavar="SRC", help="a host path, or SOCK:/path in the guest")
    p.add_argument("dst", metavar="DST", help="a host path, or SOCK:/path in the guest")
    p.add_argument("--port", type=int, default=1024, help="the agent's vsock port (default 1024)")
    p.set_defaults(func=run)


def split_guest(word: str) -> tuple[Path, str] | None:
    """``SOCK:/path`` as (SOCK, /path) when SOCK is a Unix socket here; None for a host path."""
    sock, sep, path = word.partition(":")
    if not sep or not sock:
        return None
    try:
        is_sock = stat.S_ISSOCK(Path(sock).stat().st_mode)
    except OSError:
        is_sock = False
    if not is_sock:
        return None
    if not path.startswith("/"):
        raise EvmmError(f"cp: {word!r}: the guest path must be absolute (SOCK:/path)")
    return Path(sock), path


def run(args: argparse.Namespace) -> int:
    src, dst = split_guest(args.src), split_guest(args.dst)
    if (src is None) == (dst is None):
        raise EvmmError(
            "cp: exactly one of SRC and DST must be SOCK:/path, SOCK being a running VM's control socket"
        )
    try:
        if src is not None:
            asyncio.run(_from_guest(src[0], src[1], Path(args.dst), args.port))
        elif dst is not None:
            asyncio.run(_to_guest(Path(args.src), dst[0], dst[1], args.port))
    except OSError as e:
        raise EvmmError(f"cp: {e.strerror or e}: {e.filename}" if e.filename else f"cp: {e}") from None
    return 0


async def _to_guest(local: Path, sock: Path, remote: str, port: int) -> None:
    from evmm.sandbox import Sandbox

    if not local.exists():
        raise EvmmError(f"cp: {local}: no such file or directory")
    box = await Sandbox.attach(sock, agent_port=port)
    try:
        files = box.files
        if remote.endswith("/") or (
            await files.exists(remote) and (await files.stat(remote, follow=True)).type == "dir"
        ):
            remote = posixpath.join(remote, local.name)
        if not local.is_dir():
            await files.put(local, remote)
            return
        for top, _dirs, names in os.walk(local):
            here = Path(top)
            there = posixpath.join(remote, *here.relative_to(local).parts)
            await files.mkdir(there, mode=stat.S_IMODE(here.stat().st_mode), parents=True)
            for name in names:
                path = here / name
                if path.is_file() and not path.is_symlink():
                    await files.put(path, posixpath.join(there, name))
    finally:
        await box.close()


async def _from_guest(sock: Path, remote: str, local: Path, port: int) -> None:
    from evmm.sandbox import Sandbox

    box = await Sandbox.attach(sock, agent_port=port)
    try:
        files = box.files
        info = await files.stat(remote, follow=True)
        if local.is_dir():
            local = local / posixpath.basename(remote.rstrip("/"))
        if info.type != "dir":
            await files.get(remote, local)
            return
        pending = [(remote, local, info.mode)]
        while pending:
            there, here, mode = pending.pop()
            here.mkdir(exist_ok=True)
            here.chmod(mode)
            for entry in await files.list(there):
                child = posixpath.join(there, entry.name)
                if entry.type == "dir":
                    pending.append((child, here / entry.name, entry.mode))
                elif entry.type == "file":
                    await files.get(child, here / entry.name)
    finally:
        await box.close()
