"""How the parts of a machine ask it to stop, or tell it the guest has booted, from any thread.

The builder makes a ``Lifecycle`` before any device, so it can give ``stop`` to those that end the VM (the
i8042's reset line, the ACPI power block) and ``boot_marker`` to the boot timer; the ``Machine`` it builds
last attaches to it and acts on both (Firecracker hands its devices an exit eventfd the VMM watches, for the
same reason).  A request made before the machine attached is kept and delivered when it does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from evmm.loop.vcpu_thread import StopRequest


class Lifecycle:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stop_request: StopRequest | None = None
        self.boot_marker_at: float | None = None  # time.monotonic() of the guest's first boot marker
        self._on_stop: Callable[[StopRequest], None] | None = None
        self._on_boot_marker: Callable[[float], None] | None = None

    def attach(self, on_stop: Callable[[StopRequest], None], on_boot_marker: Callable[[float], None]) -> None:
        """The machine's reactions, called on the thread that made the request, with no lock held."""
        with self._lock:
            self._on_stop, self._on_boot_marker = on_stop, on_boot_marker
            stop, booted = self.stop_request, self.boot_marker_at
        if stop is not None:
            on_stop(stop)
        if booted is not None:
            on_boot_marker(booted)

    def stop(self, code: int, message: str) -> None:
        """Stop the machine with this exit code and reason; the first request wins."""
        with self._lock:
            if self.stop_request is not None:
                return
            request = self.stop_request = StopRequest(code, message)
            react = self._on_stop
        if react is not None:
            react(request)

    def boot_marker(self) -> None:
        """The guest's init says boot is done; only the first marker counts."""
        with self._lock:
            if self.boot_marker_at is not None:
                return
            at = self.boot_marker_at = time.monotonic()
            react = self._on_boot_marker
        if react is not None:
            react(at)
