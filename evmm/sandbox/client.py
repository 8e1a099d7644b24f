"""The host's client of evmm-agent: one connection (``evmm.rpc.connection.Connection``), requests out, the
agent's ``output`` and ``exit`` events routed to the ``Process`` they belong to.

How it reaches the agent: through the VM's hybrid vsock socket (``CONNECT <port>``, Firecracker's
convention, evmm/devices/virtio/vsock/unix.py), an AF_VSOCK socket (a VM with ``--vsock vhost=on``), or a
Unix socket the agent serves itself (``evmm-agent --unix PATH``, the host tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evmm.errors import EvmmError
from evmm.rpc.connection import Connection, RpcError
from evmm.rpc.protocol import Event
from evmm.sandbox.files import Files
from evmm.sandbox.process import DEFAULT_WINDOW, ExitStatus, Process
from evmm.sandbox.spec import ExecSpec

DEFAULT_PORT = 1024
MAX_EARLY = 4096  # events held for pids whose exec answer has not been read yet


class AgentError(RpcError):
    """The agent answered a request with an error: its ``code`` and one line."""


def _agent_error(method: str, code: int, message: str) -> EvmmError:
    return AgentError(method, code, message)


class AgentClient:
    """``await AgentClient.hybrid(path)`` (or ``.vsock(cid)``, ``.unix(path)``); ``await close()`` at the end
    (the agent then kills the processes this client started, unless they were started detached)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        self.peer = peer
        self._procs: dict[int, Process] = {}
        self._early: dict[int, list[Event]] = {}
        self._conn = Connection(
            reader,
            writer,
            peer="the agent",
            name=f"agent connection ({peer})",
            on_event=self._on_event,
            on_close=self._on_close,
            error_type=_agent_error,
        )
        self.files = Files(self)

    # ---- connecting -------------------------------------------------------------------------------------

    @classmethod
    async def hybrid(cls, path: str | Path, port: int = DEFAULT_PORT, timeout: float = 10.0) -> AgentClient:
        """Through the VM's hybrid vsock socket: one attempt; ``connect_when_ready`` retries."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as e:
            raise EvmmError(f"{path}: cannot connect to the VM's vsock socket: {e.strerror or e}") from None
        try:
            writer.write(f"CONNECT {port}\n".encode())
            line = await asyncio.wait_for(reader.readline(), timeout)
        except (OSError, TimeoutError) as e:
            writer.close()
            raise EvmmError(f"{path}: no answer to CONNECT {port} ({e or 'timed out'})") from None
        if not line.startswith(b"OK "):
            writer.close()
            raise EvmmError(f"{path}: nothing listens on guest vsock port {port} (is evmm-agent running?)")
        return cls(reader, writer, f"{path} port {port}")

    @classmethod
    async def vsock(cls, cid: int, port: int = DEFAULT_PORT) -> AgentClient:
        """Over AF_VSOCK (the VM's vsock device is vhost-vsock: the guest is at ``cid``)."""
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as e:
            sock.close()
            raise EvmmError(f"vsock CID {cid} port {port}: {e.strerror or e}") from None
        return cls(reader, writer, f"vsock CID {cid} port {port}")

    @classmethod
    async def unix(cls, path: str | Path) -> AgentClient:
        """An agent serving a Unix socket itself (``evmm-agent --unix PATH``)."""
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as e:
            raise EvmmError(f"{path}: cannot connect to evmm-agent: {e.strerror or e}") from None
        return cls(reader, writer, str(path))

    @classmethod
    async def connect_when_ready(
        cls, path: str | Path, port: int = DEFAULT_PORT, *, timeout: float = 120.0, alive: Any = None
    ) -> AgentClient:
        """Retry ``hybrid`` until the agent answers a ping (the guest is booting), for at most ``timeout``
        seconds; ``alive()``, when given, says whether the VMM still runs (if not, stop at once)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        last = "the VM's vsock socket does not exist yet"
        while True:
            if alive is not None and not alive():
                raise EvmmError(f"the VMM exited before the agent answered ({last})")
            left = deadline - time.monotonic()
            if left <= 0:
                raise EvmmError(f"evmm-agent did not answer within {timeout:g} s ({last})")
            if Path(path).exists():
                try:
                    client = await cls.hybrid(path, port, timeout=left)
                    await asyncio.wait_for(client.ping(), left)
                    return client
                except (EvmmError, TimeoutError) as e:
                    last = str(e) or "no answer"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def close(self) -> None:
        await self._conn.close("the client was closed")

    @property
    def connected(self) -> bool:
        return self._conn.connected

    # ---- events -----------------------------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        pid = ev.data.get("pid")
        if not isinstance(pid, int):
            return
        proc = self._procs.get(pid)
        if proc is None:
            # The exec answer carrying this pid was read in the same batch and its caller has not run yet.
            early = self._early.setdefault(pid, [])
            if len(early) < MAX_EARLY:
                early.append(ev)
            return
        self._deliver(proc, ev)

    def _deliver(self, proc: Process, ev: Event) -> None:
        if ev.event == "output":
            data, stream = ev.data.get("data"), ev.data.get("stream")
            if isinstance(data, bytes) and isinstance(stream, str):
                proc._on_output(stream, data)
        elif ev.event == "exit":
            self._procs.pop(proc.pid, None)
            proc._on_exit(ExitStatus.from_wire(ev.data))

    def _on_close(self, reason: str) -> None:
        procs, self._procs = self._procs, {}
        for proc in procs.values():
            proc._on_lost(reason)

    def _register(self, proc: Process) -> Process:
        self._procs[proc.pid] = proc
        for ev in self._early.pop(proc.pid, []):
            self._deliver(proc, ev)
        return proc

    # ---- requests ---------------------------------------------------------------------------------------

    def send(self, method: str, params: Mapping[str, Any] | None = None) -> asyncio.Future[Any]:
        return self._conn.send(method, params)

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        return await self._conn.call(method, params)

    async def ping(self) -> None:
        await self.call("ping")

    async def version(self) -> dict[str, Any]:
        answer = await self.call("version")
        return dict(answer) if isinstance(answer, dict) else {}

    async def exec(self, spec: ExecSpec) -> Process:
        params = spec.to_wire()
        answer = await self.call("exec", params)
        pid = answer.get("pid") if isinstance(answer, dict) else None
        if not isinstance(pid, int):
            raise EvmmError(f"exec: the agent answered {answer!r} without a pid")
        proc = Process(pid, send=self.send, stdin=spec.stdin, window=spec.window or DEFAULT_WINDOW)
        return self._register(proc)

    async def attach(self, pid: int, *, stdin: bool = False, window: int = DEFAULT_WINDOW) -> Process:
        """Take over a detached process (exec with ``detach=True``) whose client has gone."""
        proc = Process(pid, send=self.send, stdin=stdin, window=window)
        self._procs[pid] = proc
        try:
            await self.call("attach", {"pid": pid, "window": window})
        except BaseException:
            self._procs.pop(pid, None)
            raise
        return self._register(proc)

    async def processes(self) -> list[dict[str, Any]]:
        answer = await self.call("processes")
        return [dict(p) for p in answer] if isinstance(answer, list) else []

    # ---- housekeeping -----------------------------------------------------------------------------------

    async def set_time(self, seconds: float | None = None) -> None:
        """The guest's clock to ``seconds`` since the epoch (this host's clock by default)."""
        now = time.time() if seconds is None else seconds
        await self.call("set-time", {"seconds": int(now), "nanoseconds": int((now % 1) * 1e9)})

    async def add_entropy(self, data: bytes, bits: int | None = None) -> None:
        params: dict[str, Any] = {"data": data}
        if bits is not None:
            params["bits"] = bits
        await self.call("add-entropy", params)

    async def sync(self) -> None:
        await self.call("sync")

    async def poweroff(self, *, reboot: bool = False) -> None:
        with contextlib.suppress(EvmmError):  # the answer may be lost with the machine
            await self.call("poweroff", {"reboot": reboot})
