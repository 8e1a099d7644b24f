"""evmm's own messages (warnings about the guest, device errors), on stderr.

While a terminal is in raw mode a bare "\\n" does not return the carriage, so the handler ends lines with
"\\r\\n" then.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("evmm")


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    raw = False

    def emit(self, record: logging.LogRecord) -> None:
        self.terminator = "\r\n" if self.raw else "\n"
        super().emit(record)


_handler = _Handler(sys.stderr)
_handler.setFormatter(logging.Formatter("evmm: %(message)s"))


def setup(verbose: bool = False) -> None:
    if _handler not in log.handlers:
        log.addHandler(_handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def set_raw_terminal(raw: bool) -> None:
    _handler.raw = raw
