"""The runtime's log (``--log FILE --log-format text|json``), written as runc writes it.

Engines read it when a command fails: containerd's runc shim (go-runc) and conmon take the ``msg`` of the last
``"level":"error"`` line of a json log as the error to report, so every failure is one such line, and the
same line goes to stderr too (runc prints fatal errors to both).  Without ``--log`` only errors are written,
to stderr.
The text format is logrus's: ``time="..." level=error msg="..."``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

LEVELS = ("debug", "info", "warning", "error")


class RuntimeLog:
    def __init__(self, path: str | None = None, fmt: str = "text", debug: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self.min_level = 0 if debug else 1
        self._fd: int | None = None

    def _open(self) -> int | None:
        if self.path is None:
            return None
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                print(f"evmm-oci: --log {self.path}: {e.strerror}", file=sys.stderr)
                self.path = None
                return None
        return self._fd

    def format(self, level: str, msg: str) -> str:
        when = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": msg, "time": when}) + "\n"
        return f'time="{when}" level={level} msg={json.dumps(msg)}\n'

    def write(self, level: str, msg: str) -> None:
        if LEVELS.index(level) < self.min_level:
            return
        line = self.format(level, msg)
        fd = self._open()
        if fd is not None:
            try:
                os.write(fd, line.encode())
            except OSError:
                pass

    def debug(self, msg: str) -> None:
        self.write("debug", msg)

    def info(self, msg: str) -> None:
        self.write("info", msg)

    def warning(self, msg: str) -> None:
        self.write("warning", msg)

    def error(self, msg: str, *, stderr: bool = True) -> None:
        """A failure: the log's last error line, and (unless the caller's stderr is the container's) stderr."""
        self.write("error", msg)
        if stderr:
            try:
                print(msg, file=sys.stderr, flush=True)
            except OSError:
                pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
