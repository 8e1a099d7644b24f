"""A VMM process whose serial console is a pipe, read on a thread with the time each byte arrived.

Both VMMs are timed the same way from the serial line: ``wait_for`` returns the moment the chunk that
completed the match was read.  The process gets its own session and ``PR_SET_PDEATHSIG``, and ``kill``
ends its whole group: no VMM outlives the benchmark.  The linux test tier drives its guests with a subclass
(tests/linux/harness.py) that raises its own errors (the ``Timeout``/``Exited``/``Failed`` class attributes).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Self

READY = "evmm-guest: ready"
PROMPT = re.compile(r"evmm:[^\n]*# ")

_prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before any fork (no dlopen in a forked child)


def _die_with_parent() -> None:
    _prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class ConsoleError(Exception):
    """The guest did not do what the benchmark expected; the message ends with the console's last lines."""


class VmProcess:
    # What the waits raise: the guest did not print in time, the VMM is gone, a command failed.
    Timeout: type[Exception] = ConsoleError
    Exited: type[Exception] = ConsoleError
    Failed: type[Exception] = ConsoleError

    def __init__(self, argv: Sequence[str], name: str) -> None:
        self.name = name
        self.argv = list(argv)
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._pos = 0
        self._eof = False
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._chunks: list[tuple[int, float]] = []  # (end offset in _buf, arrival time)
        self._reader = threading.Thread(target=self._read, name=f"{name}-console", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while data := os.read(fd, 65536):
            now = time.monotonic()
            with self._cond:
                self._buf += data
                self._chunks.append((len(self._buf), now))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _text(self) -> str:
        return bytes(self._buf).decode(errors="replace").replace("\r\n", "\n")

    def output(self) -> str:
        """Everything the console (and the VMM's stderr) printed so far."""
        with self._cond:
            return self._text()

    def tail(self, lines: int = 25) -> str:
        with self._cond:
            text = self._text()
        return "\n".join(f"  | {ln}" for ln in text.splitlines()[-lines:]) or "  | (no console output)"

    def _arrival(self, byte_end: int) -> float:
        for end, t in self._chunks:
            if end >= byte_end:
                return t
        return time.monotonic()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> tuple[re.Match[bytes], float]:
        """Wait for ``pattern`` in output not yet consumed; the match and the time its last byte arrived."""
        text = pattern.pattern if isinstance(pattern, re.Pattern) else re.escape(pattern)
        regex = re.compile(text.encode(), re.DOTALL)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Raw bytes: offsets index _buf directly (the serial line's \r\n is left as it came).
                m = regex.search(bytes(self._buf).replace(b"\r\n", b"\n"), self._pos)
                if m is not None:
                    self._pos = m.end()
                    # Offsets of the \r-stripped text are at most those of the raw bytes: count back in.
                    raw_end = _raw_offset(self._buf, m.end())
                    return m, self._arrival(raw_end)
                if self._eof:
                    code = self.proc.wait()
                    raise self.Exited(f"{self.name}: exited ({code}) before {regex.pattern!r}\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.Timeout(
                        f"{self.name}: no {regex.pattern!r} within {timeout:g} s\n{self.tail()}"
                    )
                self._cond.wait(left)

    def sendline(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self.Exited(f"{self.name}: exited; cannot send {text!r}\n{self.tail()}") from None

    def run(self, command: str, timeout: float) -> tuple[str, int]:
        """Run ``command`` in the guest's shell: its output and exit status."""
        token = uuid.uuid4().hex[:12]
        # The quotes keep the echoed command line from matching the markers.
        self.sendline(f"echo @@''{token}-begin; {command}; echo @@''{token}-end:$?")
        m, _ = self.wait_for(re.compile(rf"@@{token}-begin\n(.*?)@@{token}-end:(\d+)\n"), timeout)
        return m.group(1).decode(errors="replace"), int(m.group(2))

    def check(self, command: str, timeout: float) -> str:
        out, status = self.run(command, timeout)
        if status != 0:
            raise self.Failed(f"{self.name}: `{command}` exited {status}:\n{out.strip()[-2000:]}")
        return out

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        """The exit status and the moment it was seen."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.Timeout(f"{self.name}: still running {timeout:g} s later\n{self.tail()}") from None
        return code, time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, wait: float = 15.0) -> bool:
        """SIGKILL the VMM's process group; False if it is still there ``wait`` seconds later (a vCPU stuck in
        the kernel: nothing more a user process can do)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return False
        # The reader ends at the pipe's EOF.  A descendant of the VMM that outlived it may still hold the pipe:
        # then the reader keeps it (closing it under a blocked read would fail that read with EBADF, or hand
        # the number to the next file opened) and ends with that descendant.
        self._reader.join(5)
        streams = [self.proc.stdin] if self._reader.is_alive() else [self.proc.stdin, self.proc.stdout]
        for stream in streams:
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        return True


def _raw_offset(raw: bytearray, stripped_end: int) -> int:
    """The offset in ``raw`` of position ``stripped_end`` of ``raw`` with every \\r\\n made \\n."""
    if b"\r\n" not in raw:
        return stripped_end
    seen = 0
    i = 0
    n = len(raw)
    while i < n and seen < stripped_end:
        if raw[i] == 0x0D and i + 1 < n and raw[i + 1] == 0x0A:
            i += 1  # the \r is dropped; the \n counts below
        i += 1
        seen += 1
    return i
