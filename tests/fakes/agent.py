"""Agents for tests of evmm's guest agent and its host API, all without a VM.

- ``HostAgent``: the real evmm-agent, built for the host with AddressSanitizer and UBSan, serving a Unix
  socket (``evmm-agent --unix``); ``stop`` fails the test if a sanitizer reported anything.
- ``RawClient``: frames in and out over a blocking socket, for hostile input.
- ``FakeAgent``: the agent protocol in Python, scripted (``programs``), recording what the host did with the
  windows it was given, for tests of ``evmm.sandbox`` (flow control, early events, lost connections).
- ``python -m tests.fakes.agent run ... --api-sock S --vsock cid=N,path=P``: a fake ``evmm run`` for
  ``Sandbox`` tests: a control socket over a fake machine and a ``FakeAgent`` behind a hybrid vsock socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from evmm import agent
from evmm.rpc.protocol import (
    Decoder,
    ProtocolError,
    encode_frame,
    error,
    event,
    parse_request,
    request,
    result,
)

# ---- the real agent on the host ------------------------------------------------------------------------


class HostAgent:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="evmm-ag-", dir="/tmp"))
        self.path = self.dir / "agent.sock"
        self.stderr = self.dir / "stderr"
        binary = agent.build(variant="sanitized")
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(binary), "--unix", str(self.path)], stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"evmm-agent did not start: {self.stderr.read_text()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> HostAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        alive = self.proc.poll() is None
        if alive:
            self.proc.terminate()
            self.proc.wait(10)
        text = self.stderr.read_text(errors="replace")
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()
        assert alive, f"evmm-agent died ({self.proc.returncode}):\n{text}"
        assert "Sanitizer" not in text and "runtime error" not in text, text


def host_agent_fixtures() -> tuple[object, object]:
    """``host_agent, client = host_agent_fixtures()`` in a test module: a ``HostAgent`` for the module and,
    per test, an ``AgentClient`` connected to it."""
    import pytest

    from evmm.sandbox import AgentClient

    @pytest.fixture(scope="module")
    def host_agent() -> Iterator[HostAgent]:
        with HostAgent() as a:
            yield a

    @pytest.fixture
    async def client(host_agent: HostAgent) -> AsyncIterator[AgentClient]:
        c = await AgentClient.unix(host_agent.path)
        yield c
        await c.close()

    return host_agent, client


class RawClient:
    """A blocking client: ``send`` a frame (or raw bytes), ``recv`` the next message."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = Decoder()
        self.queue: list[dict[str, Any]] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, id: int | str, method: str, params: Any = None) -> None:
        self.sock.sendall(encode_frame(request(id, method, params)))

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the agent closed the connection."""
        while not self.queue:
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            for item in self.decoder.feed(data):
                assert not isinstance(item, ProtocolError), f"the agent sent a bad frame: {item.message}"
                self.queue.append(item)
        return self.queue.pop(0)

    def answer(self, id: int | str) -> dict[str, Any]:
        """The answer to request ``id`` (events before it are dropped)."""
        while (msg := self.recv()) is not None:
            if "id" in msg and msg["id"] == id:
                return msg
        raise AssertionError(f"the agent closed the connection before answering {id!r}")

    def call(self, method: str, params: Any = None) -> dict[str, Any]:
        self.send(1, method, params)
        return self.answer(1)

    def close(self) -> None:
        self.sock.close()


# ---- the fake agent ------------------------------------------------------------------------------------


class FakeProcess:
    def __init__(self, agent: FakeAgent, conn: _Conn, pid: int, argv: list[str], window: int) -> None:
        self.agent = agent
        self.conn = conn
        self.pid = pid
        self.argv = argv
        self.window = {"stdout": window, "stderr": window}
        self.unacked = {"stdout": 0, "stderr": 0}
        self.credit = asyncio.Event()
        self.stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.exited = False

    async def emit(self, stream: str, data: bytes) -> None:
        """Send output the way the agent does: never more than the window the host gave."""
        view = memoryview(data)
        while view:
            while self.window[stream] == 0:
                self.credit.clear()
                await self.credit.wait()
            n = min(len(view), self.window[stream], 65536)
            self.window[stream] -= n
            self.unacked[stream] += n
            self.agent.max_unacked = max(self.agent.max_unacked, self.unacked[stream])
            self.conn.send(
                event("output", {"pid": self.pid, "stream": stream, "data": bytes(view[:n])}, time.time())
            )
            view = view[n:]

    def exit(self, code: int | None = 0, sig: int | None = None) -> None:
        self.exited = True
        self.conn.send(
            event("exit", {"pid": self.pid, "code": code, "signal": sig, "core_dumped": False}, time.time())
        )


Program = Callable[[FakeProcess], Awaitable[None]]


async def _echo(p: FakeProcess) -> None:
    await p.emit("stdout", " ".join(p.argv[1:]).encode() + b"\n")
    p.exit(0)


async def _fail(p: FakeProcess) -> None:
    await p.emit("stderr", b"failing\n")
    p.exit(int(p.argv[1]))


async def _flood(p: FakeProcess) -> None:
    size = int(p.argv[1])
    await p.emit("stdout", bytes(i % 251 for i in range(size)))
    p.exit(0)


async def _cat(p: FakeProcess) -> None:
    while (data := await p.stdin.get()) is not None:
        await p.emit("stdout", data)
    p.exit(0)


async def _sleep(p: FakeProcess) -> None:
    p.exit(None, await p.signals.get())


PROGRAMS: dict[str, Program] = {"echo": _echo, "fail": _fail, "flood": _flood, "cat": _cat, "sleep": _sleep}


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(message))


class FakeAgent:
    """A Unix-socket server speaking the agent protocol; ``hybrid``: expects ``CONNECT <port>`` first."""

    def __init__(self, path: Path, *, hybrid: bool = False, port: int = 1024) -> None:
        self.path = path
        self.hybrid = hybrid
        self.port = port
        self.programs = dict(PROGRAMS)
        self.files: dict[str, bytes] = {}
        self.procs: dict[int, FakeProcess] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.max_unacked = 0  # the most bytes of one stream the host had not granted back
        self.stdin_gate = asyncio.Event()  # stdin writes are answered only while it is set
        self.stdin_gate.set()
        self.corrupt_reads = False  # file-close reports a CRC-32 that does not match
        self.list_page = 1000
        self._next_pid = 100
        self._handles: dict[int, dict[str, Any]] = {}
        self._conns: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> FakeAgent:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def close(self) -> None:
        self.hang_up()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def hang_up(self) -> None:
        """Drop every connection, as an agent that was killed would."""
        for w in self._conns:
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.append(writer)
        if self.hybrid:
            line = await reader.readline()
            if line != f"CONNECT {self.port}\n".encode():
                writer.close()
                return
            writer.write(b"OK 1073741824\n")
        conn = _Conn(writer)
        decoder = Decoder()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                for item in decoder.feed(data):
                    if isinstance(item, ProtocolError):
                        conn.send(error(None, item.code, item.message))
                        continue
                    req = parse_request(item)
                    self.requests.append((req.method, req.params))
                    self._spawn(self._answer(conn, req.id, req.method, req.params))
        writer.close()

    async def _answer(self, conn: _Conn, id: int | str, method: str, params: dict[str, Any]) -> None:
        handler = getattr(self, "m_" + method.replace("-", "_"), None)
        if handler is None:
            conn.send(error(id, -32601, f"no method {method!r} in the fake agent"))
            return
        try:
            value = await handler(conn, params)
        except OSError as e:
            conn.send(error(id, -33000 - (e.errno or 0), f"{method} {params.get('path')}: {e.strerror}"))
        except (KeyError, ValueError) as e:
            conn.send(error(id, -32002, f"{method}: {e}"))
        else:
            conn.send(result(id, value))

    # ---- methods -------------------------------------------------------------------------------------

    async def m_ping(self, conn: _Conn, params: dict[str, Any]) -> Any:
        return {}

    async def m_exec(self, conn: _Conn, params: dict[str, Any]) -> Any:
        argv = params["argv"]
        program = self.programs.get(argv[0])
        if program is None:
            raise ValueError(f"{argv[0]}: no such fake program")
        self._next_pid += 1
        proc = FakeProcess(self, conn, self._next_pid, argv, params.get("window", 256 << 10))
        self.procs[proc.pid] = proc
        # The answer goes out first, as the agent's does: the program runs after this call returns.
        asyncio.get_running_loop().call_soon(self._spawn, program(proc))
        return {"pid": proc.pid}

    async def m_credit(self, conn: _Conn, params: dict[str, Any]) -> Any:
        proc = self.procs[params["pid"]]
        proc.window[params["stream"]] += params["bytes"]
        proc.unacked[params["stream"]] -= params["bytes"]
        proc.credit.set()
        return {}

    async def m_stdin(self, conn: _Conn, params: dict[str, Any]) -> Any:
        await self.stdin_gate.wait()
        await self.procs[params["pid"]].stdin.put(params["data"])
        return {"written": len(params["data"])}

    async def m_stdin_close(self, conn: _Conn, params: dict[str, Any]) -> Any:
        await self.procs[params["pid"]].stdin.put(None)
        return {}

    async def m_signal(self, conn: _Conn, params: dict[str, Any]) -> Any:
        sig = params["signal"]
        number = sig if isinstance(sig, int) else signal.Signals["SIG" + sig.removeprefix("SIG")].value
        await self.procs[params["pid"]].signals.put(number)
        return {}

    async def m_resize(self, conn: _Conn, params: dict[str, Any]) -> Any:
        return {}

    async def m_file_put(self, conn: _Conn, params: dict[str, Any]) -> Any:
        handle = len(self._handles) + 1
        self._handles[handle] = {"path": params["path"], "data": bytearray(), "mode": params.get("mode")}
        return {"handle": handle}

    async def m_file_write(self, conn: _Conn, params: dict[str, Any]) -> Any:
        self._handles[params["handle"]]["data"] += params["data"]
        return {}

    async def m_file_commit(self, conn: _Conn, params: dict[str, Any]) -> Any:
        h = self._handles.pop(params["handle"])
        data = bytes(h["data"])
        if params["size"] != len(data) or params["crc32"] != zlib.crc32(data):
            raise ValueError("size or CRC-32 mismatch")
        self.files[h["path"]] = data
        return {"size": len(data), "crc32": zlib.crc32(data)}

    async def m_file_get(self, conn: _Conn, params: dict[str, Any]) -> Any:
        if params["path"] not in self.files:
            raise FileNotFoundError(2, "No such file or directory")
        handle = len(self._handles) + 1
        data = self.files[params["path"]]
        self._handles[handle] = {"data": data, "pos": 0}
        return {"handle": handle, "size": len(data), "mode": 0o640, "uid": 0, "gid": 0, "mtime": 0.0}

    async def m_file_read(self, conn: _Conn, params: dict[str, Any]) -> Any:
        h = self._handles[params["handle"]]
        chunk = h["data"][h["pos"] : h["pos"] + params["length"]]
        h["pos"] += len(chunk)
        return {"data": chunk}

    async def m_file_close(self, conn: _Conn, params: dict[str, Any]) -> Any:
        h = self._handles.pop(params["handle"])
        crc = zlib.crc32(h["data"]) ^ (1 if self.corrupt_reads else 0)
        return {"size": len(h["data"]), "crc32": crc}

    async def m_stat(self, conn: _Conn, params: dict[str, Any]) -> Any:
        if params["path"] not in self.files:
            raise FileNotFoundError(2, "No such file or directory")
        size = len(self.files[params["path"]])
        return {"type": "file", "mode": 0o644, "size": size, "uid": 0, "gid": 0, "mtime": 0.0}

    async def m_list(self, conn: _Conn, params: dict[str, Any]) -> Any:
        names = sorted(p for p in self.files if p.startswith(params["path"].rstrip("/") + "/"))
        start = params.get("start", 0)
        page = names[start : start + self.list_page]
        entries = [
            {
                "name": n.rsplit("/", 1)[1],
                "type": "file",
                "mode": 0o644,
                "size": len(self.files[n]),
                "uid": 0,
                "gid": 0,
                "mtime": 0.0,
            }
            for n in page
        ]
        more = start + len(page) < len(names)
        return {"entries": entries, "next": start + len(page) if more else None}

    async def m_poweroff(self, conn: _Conn, params: dict[str, Any]) -> Any:
        return {}


# ---- a fake `evmm run` for Sandbox tests ---------------------------------------------------------------


async def _fake_run(argv: list[str]) -> int:
    from evmm.control import start_control
    from tests.fakes.machine import FakeMachine

    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    vsock_path = Path(dict(kv.split("=", 1) for kv in opts["--vsock"].split(","))["path"])
    if os.environ.get("FAKE_VMM_FAIL"):
        print("evmm: --kernel /nope: no such file", flush=True)
        return 1
    await asyncio.sleep(float(os.environ.get("FAKE_VMM_BOOT", "0")))  # the guest booting

    class Machine(FakeMachine):
        def device_list(self) -> list[dict[str, Any]]:
            virtio = {"device": "virtio-vsock", "vsock": {"cid": 3, "path": str(vsock_path)}}
            return [*super().device_list(), {"name": "virtio-mmio0", "virtio": virtio}]

    machine = Machine()
    close = await start_control(machine, None, api_sock=Path(opts["--api-sock"]), qmp=None)
    real = os.environ.get("FAKE_VMM_AGENT")  # a real agent's Unix socket to put behind the vsock socket
    server = await (
        HybridProxy(vsock_path, Path(real)) if real else FakeAgent(vsock_path, hybrid=True)
    ).start()
    print("evmm-guest: ready", flush=True)
    while machine.stop_request is None:
        await asyncio.sleep(0.02)
    await server.close()
    await close()
    return machine.stop_request[0]


class HybridProxy:
    """A hybrid vsock socket (``CONNECT <port>``) in front of a real agent's Unix socket (``--unix``)."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> HybridProxy:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not (await reader.readline()).startswith(b"CONNECT "):
            writer.close()
            return
        agent_reader, agent_writer = await asyncio.open_unix_connection(str(self.target))
        writer.write(b"OK 1073741824\n")

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, agent_writer), copy(agent_reader, writer))


if __name__ == "__main__":
    if sys.argv[1:2] != ["run"]:
        sys.exit("usage: python -m tests.fakes.agent run [evmm run options]")
    sys.exit(asyncio.run(_fake_run(sys.argv[2:])))
