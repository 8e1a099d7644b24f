"""What ``evmm run`` imports before the main thread's filter goes on, for the control methods to use later.

The first import from a directory makes CPython list it (getdents64: its FileFinder caches each directory's
entries), and importlib.metadata lists site-packages to find evmm's version.  The main thread's list does
not allow getdents64, so everything the control channel and the escape menu would load on first use after
the filter is on is loaded here, once, with confinement on, in these lists (~35 ms with a control socket,
mostly the snapshot code and importlib.metadata; nothing without one).  A control method that gains
a lazy import adds it here (tests/kvm/test_run_confined.py drives every method under ``--seccomp kill``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evmm.machine.machine import Machine

# With a control socket (--api-sock, --qmp): what its methods import on first use.
CONTROL_MODULES = (
    "msgpack",  # the control channel's codec: evmm.rpc.protocol imports it on the first message
    "evmm.snapshot.save",  # snapshot (evmm/snapshot/commands.py): the snapshot code, the legacy devices' state
)
# With a control socket on a board with PCI (--machine standard): what device-add imports to build the device.
HOTPLUG_MODULES = ("evmm.devices.virtio.blk", "evmm.devices.virtio.net")
# With a person at the terminal: the escape menu's status line (evmm.control.prompt.render imports rich; the
# menu's methods, query-vm, pause, resume and quit, import nothing).
INTERACTIVE_MODULES = ("rich.console", "rich.text")


def preload(machine: Machine, *, control: bool, interactive: bool) -> None:
    """Import what a control socket's methods (``control``) and the escape menu (``interactive``) need."""
    hotplug = control and machine.devices.pci is not None
    for name in (
        *(CONTROL_MODULES if control else ()),
        *(HOTPLUG_MODULES if hotplug else ()),
        *(INTERACTIVE_MODULES if interactive else ()),
    ):
        importlib.import_module(name)
    if control:
        from evmm.snapshot import devices
        from evmm.snapshot.format import SnapshotError, evmm_version

        evmm_version()  # a state file carries it (cached once read: importlib.metadata lists site-packages)
        for t in devices.transports(machine):  # a snapshot picks each virtio device's persist module by type
            try:
                devices.virtio_persist(t.device)
            except SnapshotError:
                pass  # a device no snapshot carries: the refusal imports nothing
    if interactive:
        from evmm.control.prompt import Status, render

        render(Status("running", 1, 0.0), "", detach=False)  # rich loads more on its first render


__all__ = ["CONTROL_MODULES", "HOTPLUG_MODULES", "INTERACTIVE_MODULES", "preload"]
