"""The person's terminal: raw mode while a guest console owns it, and always restored afterwards."""

from __future__ import annotations

import atexit
import contextlib
import os
import termios
import tty
from types import TracebackType
from typing import Any


class RawTerminal:
    """Context manager: put ``fd`` in raw mode if it is a terminal; restore it on every way out."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.active = os.isatty(fd)
        self._saved: list[Any] | None = None

    def __enter__(self) -> RawTerminal:
        if self.active:
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.restore)
            # Raw input so Ctrl-C, Ctrl-Z reach the guest; keep output post-processing off as well, since the
            # guest's tty layer already turns "\n" into "\r\n".
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()
        atexit.unregister(self.restore)
