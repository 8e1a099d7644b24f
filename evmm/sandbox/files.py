"""Files in the guest: read and write streamed in chunks (any size), stat, list, mkdir, remove.

A write goes to a temporary file beside the target, which the agent renames over the target only when the
length and CRC-32 it received match what was sent; a read is checked against the CRC-32 the agent computed
over what it read.  Up to ``DEPTH`` chunk requests are in flight at once, so a transfer is not one round
trip per chunk.  A failed system call in the guest raises the matching ``OSError`` (``FileNotFoundError``,
``PermissionError``, ...) with the agent's one-line message.
"""

from __future__ import annotations

import asyncio
import collections
import os
import stat as stat_mod
import zlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evmm.errors import EvmmError
from evmm.record import record
from evmm.rpc.connection import RpcError

if TYPE_CHECKING:
    from evmm.sandbox.client import AgentClient

CHUNK = 256 << 10
DEPTH = 4
OS_ERROR_BASE = -33000  # the agent's code for a failed system call is OS_ERROR_BASE - errno


@record(frozen=True)
class FileStat:
    type: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits (with setuid, setgid, sticky)
    size: int
    uid: int
    gid: int
    mtime: float
    name: str = ""  # in list() results
    target: str | None = None  # a symlink's, from stat()

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> FileStat:
        def text(v: Any) -> str:
            return os.fsdecode(v) if isinstance(v, bytes) else str(v)

        target = data.get("target")
        return cls(
            type=str(data["type"]),
            mode=int(data["mode"]),
            size=int(data["size"]),
            uid=int(data["uid"]),
            gid=int(data["gid"]),
            mtime=float(data["mtime"]),
            name=text(data.get("name", "")),
            target=None if target is None else text(target),
        )


def os_error(e: RpcError) -> Exception:
    """The agent's error for a failed system call as the OSError Python raises for that errno."""
    if e.code <= OS_ERROR_BASE:
        return OSError(OS_ERROR_BASE - e.code, str(e))
    return e


class Files:
    def __init__(self, client: AgentClient) -> None:
        self._client = client

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        try:
            return await self._client.call(method, params)
        except RpcError as e:
            raise os_error(e) from None

    # ---- writing ----------------------------------------------------------------------------------------

    async def write_stream(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        uid: int | None = None,
        gid: int | None = None,
    ) -> int:
        """Write what ``chunks`` yields to ``path`` in the guest; returns the bytes written."""
        params: dict[str, Any] = {"path": path, "mode": mode}
        if uid is not None:
            params["uid"] = uid
        if gid is not None:
            params["gid"] = gid
        handle = (await self._call("file-put", params))["handle"]
        size, crc = 0, 0
        inflight: collections.deque[asyncio.Future[Any]] = collections.deque()
        try:
            async for data in chunks:
                view = memoryview(data)
                for start in range(0, len(view), CHUNK):
                    piece = bytes(view[start : start + CHUNK])
                    size += len(piece)
                    crc = zlib.crc32(piece, crc)
                    inflight.append(self._client.send("file-write", {"handle": handle, "data": piece}))
                    while len(inflight) >= DEPTH:
                        await inflight.popleft()
            while inflight:
                await inflight.popleft()
            await self._call("file-commit", {"handle": handle, "size": size, "crc32": crc})
        except BaseException as e:
            for fut in inflight:
                fut.add_done_callback(lambda f: f.exception())
            if self._client.connected:
                self._client.send("file-close", {"handle": handle}).add_done_callback(lambda f: f.exception())
            if isinstance(e, RpcError):
                raise os_error(e) from None
            raise
        return size

    async def write(
        self, path: str, data: bytes, *, mode: int = 0o644, uid: int | None = None, gid: int | None = None
    ) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.write_stream(path, one(), mode=mode, uid=uid, gid=gid)

    async def put(
        self,
        local: str | Path,
        remote: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> int:
        """Copy a host file into the guest, with its mode unless ``mode`` is given; returns its size."""
        src = Path(local)
        st = src.stat()
        if not stat_mod.S_ISREG(st.st_mode):
            raise EvmmError(f"{src}: not a regular file")
        f = await asyncio.to_thread(src.open, "rb")

        async def chunks() -> AsyncIterator[bytes]:
            while data := await asyncio.to_thread(f.read, CHUNK * DEPTH):
                yield data

        try:
            return await self.write_stream(
                remote,
                chunks(),
                mode=stat_mod.S_IMODE(st.st_mode) if mode is None else mode,
                uid=uid,
                gid=gid,
            )
        finally:
            f.close()

    # ---- reading ----------------------------------------------------------------------------------------

    async def open_read(self, path: str) -> tuple[FileStat, AsyncIterator[bytes]]:
        """The file's stat and an iterator over its bytes, checked against the agent's CRC-32 at the end."""
        answer = await self._call("file-get", {"path": path})
        info = FileStat.from_wire({**answer, "type": "file"})
        return info, self._chunks(path, int(answer["handle"]))

    async def _chunks(self, path: str, handle: int) -> AsyncIterator[bytes]:
        inflight: collections.deque[asyncio.Future[Any]] = collections.deque()
        size, crc, ended = 0, 0, False
        try:
            while not ended or inflight:
                while not ended and len(inflight) < DEPTH:
                    inflight.append(self._client.send("file-read", {"handle": handle, "length": CHUNK}))
                data = (await inflight.popleft())["data"]
                if not data:
                    ended = True  # reads already in flight past the end come back empty too
                    continue
                size += len(data)
                crc = zlib.crc32(data, crc)
                yield data
            theirs = await self._call("file-close", {"handle": handle})
        except RpcError as e:
            raise os_error(e) from None
        finally:
            for fut in inflight:
                fut.add_done_callback(lambda f: f.exception())
            if not ended and self._client.connected:
                self._client.send("file-close", {"handle": handle}).add_done_callback(lambda f: f.exception())
        if theirs.get("size") != size or theirs.get("crc32") != crc:
            raise EvmmError(
                f"{path}: the agent read {theirs.get('size')} bytes (CRC-32 {theirs.get('crc32')}), "
                f"{size} arrived (CRC-32 {crc})"
            )

    async def read(self, path: str) -> bytes:
        _, chunks = await self.open_read(path)
        return b"".join([c async for c in chunks])

    async def get(self, remote: str, local: str | Path) -> int:
        """Copy a guest file to the host, with its permission bits; returns its size."""
        info, chunks = await self.open_read(remote)
        dst = Path(local)
        size = 0
        with dst.open("wb") as f:
            async for data in chunks:
                await asyncio.to_thread(f.write, data)
                size += len(data)
        dst.chmod(info.mode & 0o7777)
        return size

    # ---- metadata ---------------------------------------------------------------------------------------

    async def stat(self, path: str, *, follow: bool = False) -> FileStat:
        return FileStat.from_wire(await self._call("stat", {"path": path, "follow": follow}))

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except FileNotFoundError:
            return False
        return True

    async def list(self, path: str) -> list[FileStat]:
        out: list[FileStat] = []
        start: int | None = 0
        while start is not None:
            answer = await self._call("list", {"path": path, "start": start})
            out += [FileStat.from_wire(e) for e in answer["entries"]]
            start = answer.get("next")
        return out

    async def mkdir(self, path: str, *, mode: int = 0o755, parents: bool = False) -> None:
        await self._call("mkdir", {"path": path, "mode": mode, "parents": parents})

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self._call("remove", {"path": path, "recursive": recursive})
