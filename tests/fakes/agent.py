"""Agents for tests of evmm's guest agent and its host API, all without a VM.

- ``HostAgent``: the real evmm-agent, built for the host with AddressSanitizer and UBSan, serving a Unix
  socket (``evmm-agent --unix``); ``stop`` fails the test if a sanitizer reported anything.
- ``RawClient``: frames in and out over a blocking socket, for hostile input.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from evmm import agent
from evmm.rpc.protocol import (
    Decoder,
    ProtocolError,
    encode_frame,
    request,
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
