"""virtio-console's state for a snapshot (evmm/devices/virtio/console.py): nothing the driver depends on
beyond its rings.  The window size is the restored endpoint's (a new terminal), and output the old endpoint
had not written yet is gone with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evmm.devices.virtio.console import VirtioConsole
from evmm.devices.virtio.device import CONFIG_CHANGE
from evmm.snapshot.format import Fields

VERSION = 1


def freeze(console: VirtioConsole) -> Callable[[], None]:
    """Leave the endpoint's input with the host while guest memory is saved (input placed meanwhile would change
    RAM behind the saved ring indices); ``thaw`` watches it again if the device did."""
    ctx, wanted = console.ctx, console.backend._want_input
    console.backend.want_input(False)

    def thaw() -> None:
        if console.ctx is ctx:
            console.backend.want_input(wanted)

    return thaw


def save(console: VirtioConsole) -> dict[str, Any]:
    return {"v": VERSION, "cols": console.cols, "rows": console.rows, "bytes_in": console.bytes_in,
            "bytes_out": console.bytes_out}  # fmt: skip


def restore(console: VirtioConsole, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    console.bytes_in, console.bytes_out = f.integer("bytes_in"), f.integer("bytes_out")


def after_restore(console: VirtioConsole) -> None:
    # The size the guest knew may not be the new endpoint's: a config interrupt makes it read it (§5.3.6).
    if console.ctx is not None:
        console.ctx.interrupt.trigger(CONFIG_CHANGE)
