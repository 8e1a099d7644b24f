"""``evmm-oci exec``'s side: a process of the container's guest, driven through the container monitor.

``RemoteProcess`` is a ``GuestProcess`` whose calls go over the monitor's socket (evmm/oci/rpc.py): its output
arrives as events and is acknowledged as it is written out (the monitor sends at most ``EXEC_WINDOW`` bytes
ahead), so the exec monitor relays it with the same code as the container monitor (evmm/oci/hostio.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from evmm.errors import EvmmError
from evmm.oci import rpc
from evmm.oci.guest import ExitStatus, ProcessRequest
from evmm.rpc.connection import Connection
from evmm.rpc.protocol import Event


class RemoteProcess:
    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.id = 0
        self._chunks: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self._exit: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()

    @classmethod
    async def start(cls, socket: Path, request: ProcessRequest, client_pid: int) -> RemoteProcess:
        self = cls()
        # The monitor gone mid-exec (_on_close): the process went with its VM.
        self.conn = await rpc.connect(socket, self._on_event, self._on_close)
        process = {k: v for k, v in asdict(request).items() if k not in ("container", "join")}
        try:
            answer = await self.conn.call("exec", {"process": process, "client_pid": client_pid})
        except EvmmError:
            await self.conn.close()
            raise
        self.id = int(answer["id"])
        return self

    def _on_event(self, e: Event) -> None:
        if e.event == "output" and isinstance(e.data.get("data"), bytes):
            self._chunks.put_nowait((int(e.data.get("stream", 1)), e.data["data"]))
        elif e.event == "exit" and not self._exit.done():
            signum = e.data.get("signal")
            code = e.data.get("code")
            self._exit.set_result(
                ExitStatus(
                    int(code) if isinstance(code, int) else 255, signum if isinstance(signum, int) else None
                )
            )
            self._chunks.put_nowait(None)

    def _on_close(self, reason: str) -> None:
        if not self._exit.done():
            self._exit.set_exception(EvmmError(f"exec: {reason}"))
            self._chunks.put_nowait(None)

    def _conn(self) -> Connection:
        if self.conn is None:
            raise EvmmError("exec: not started")
        return self.conn

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        while (item := await self._chunks.get()) is not None:
            yield item
            if self.conn is not None and self.conn.connected:
                self.conn.send_nowait("ack", {"id": self.id, "bytes": len(item[1])})

    async def write(self, data: bytes) -> None:
        await self._conn().call("stdin", {"id": self.id, "data": data})

    async def close_stdin(self) -> None:
        await self._conn().call("stdin-close", {"id": self.id})

    async def signal(self, signum: int) -> None:
        await self._conn().call("signal", {"id": self.id, "signal": signum})

    async def resize(self, rows: int, cols: int) -> None:
        await self._conn().call("resize", {"id": self.id, "rows": rows, "cols": cols})

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exit)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
