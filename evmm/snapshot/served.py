"""A warm VMM waiting for its machine: ``evmm serve``'s control methods ``boot`` and ``restore``.

``evmm serve`` imports everything a machine needs and listens on its control socket before any machine
exists, so that a restore pays for no Python start-up: on a slow host that start-up is most of a cold
``evmm run --restore`` (seconds in the KVM test host), and a pool of warm servers turns it into the cost of
the restore alone.  One process serves one machine, once (as Firecracker's): when it stops, the process ends.

``ServedMachine`` is what the control plane talks to: empty until ``boot`` or ``restore`` gives it a
machine, then a window onto that machine, with its events passed on.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evmm.config.devspec import DriveSpec, NetSpec, parse_drive, parse_net, parse_virtio_console, parse_vsock
from evmm.control.commands import Call, Command, CommandError, Commands, Param
from evmm.errors import EvmmError
from evmm.loop.console import ConsoleIO
from evmm.loop.vcpu_thread import StopRequest
from evmm.machine.machine import Machine
from evmm.rpc.protocol import ErrorCode

Listener = Callable[[str, dict[str, Any]], None]


class ServedMachine:
    """The control plane's machine in ``evmm serve``: "empty" until one is booted or restored into it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_empty_stop: Callable[[int, str], None]) -> None:
        self.loop = loop
        self.target: Machine | None = None
        self.ran: asyncio.Future[StopRequest] = loop.create_future()  # what stopped the machine
        self._listeners: list[Listener] = []
        self._on_empty_stop = on_empty_stop

    def attach(self, machine: Machine) -> None:
        self.target = machine
        machine.subscribe(self.emit)
        running = asyncio.ensure_future(machine.run())
        running.add_done_callback(lambda t: self.ran.set_result(t.result()) if not t.cancelled() else None)

    def _machine(self) -> Machine:
        if self.target is None:
            raise EvmmError("there is no VM yet: boot or restore one first")
        return self.target

    @property
    def state(self) -> str:
        return self.target.state if self.target is not None else "empty"

    async def pause(self) -> None:
        await self._machine().pause()

    async def resume(self) -> None:
        await self._machine().resume()

    def stop(self, code: int, message: str) -> None:
        if self.target is not None:
            self.target.stop(code, message)
        else:
            self._on_empty_stop(code, message)

    def power_button(self) -> None:
        self._machine().power_button()

    def ctrl_alt_del(self) -> bool:
        return self._machine().ctrl_alt_del()

    def describe(self) -> dict[str, Any]:
        return self.target.describe() if self.target is not None else {"state": "empty"}

    def device_list(self) -> list[dict[str, Any]]:
        return self.target.device_list() if self.target is not None else []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            listener(event, data)

    def hotplug_slots(self) -> list[dict[str, Any]]:
        return self._machine().hotplug_slots()

    def replace_device(self, slot_id: str, spec: DriveSpec | NetSpec) -> object:
        return self._machine().replace_device(slot_id, spec)

    def remove_device(self, slot_id: str) -> object:
        return self._machine().remove_device(slot_id)


def _specs(text: str | None) -> list[str]:
    """Several device specs in one parameter, separated by ';' (a spec itself uses ',')."""
    return [] if text is None else [s for s in text.split(";") if s]


def register(commands: Commands, served: ServedMachine, console: ConsoleIO | None) -> None:
    """Add ``boot`` and ``restore``: each builds the one machine of this process and starts it."""
    lock = asyncio.Lock()

    def claim(method: str) -> None:
        if served.target is not None:
            raise CommandError(ErrorCode.VM_STATE, f"{method}: this VMM already has a VM ({served.state})")

    async def restore(call: Call) -> dict[str, Any]:
        from evmm.snapshot.config import Overrides
        from evmm.snapshot.restore import load_snapshot, restore_machine

        async with lock:
            claim(call.method)
            start = time.monotonic()
            p = call.params
            overrides = Overrides(
                drives=tuple(parse_drive(s) for s in _specs(p["drive"])) or None,
                nets=tuple(parse_net(s) for s in _specs(p["net"])) or None,
                vsock=parse_vsock(p["vsock"]) if p["vsock"] is not None else None,
                console=parse_virtio_console(p["virtio_console"])
                if p["virtio_console"] is not None
                else None,
            )
            snap = load_snapshot(Path(p["dir"]), overrides)
            machine = restore_machine(snap, served.loop, console)
            served.attach(machine)
            return {"state": "running", "ms": round((time.monotonic() - start) * 1000, 1)}

    async def boot(call: Call) -> dict[str, Any]:
        from evmm.cli.run_cmd import config_from_args
        from evmm.machine.microvm import build_microvm

        async with lock:
            claim(call.method)
            start = time.monotonic()
            p = call.params
            args = argparse.Namespace(
                kernel=Path(p["kernel"]) if p["kernel"] else None,
                initrd=Path(p["initrd"]) if p["initrd"] else None,
                append=p["append"] or "",
                memory=p["memory"],
                cpus=str(p["cpus"]),
                drive=_specs(p["drive"]),
                net=_specs(p["net"]),
                vsock=p["vsock"],
                virtio_console=None,
                rng="on" if p["rng"] else None,
                hotplug=None,
                virtio_mmio_cmdline=None,
            )
            machine = build_microvm(config_from_args(args), served.loop, console)
            served.attach(machine)
            return {"state": "running", "ms": round((time.monotonic() - start) * 1000, 1)}

    specs = {
        "drive": Param(str, "--drive specs, ';' between several"),
        "net": Param(str, "--net specs, ';' between several"),
        "vsock": Param(str, "a --vsock spec"),
    }
    commands.register(
        Command(
            "restore",
            restore,
            "restore the snapshot in dir into this VMM and run it (host resources given again as for "
            "evmm run --restore)",
            {
                "dir": Param(str, "the snapshot directory", required=True),
                **specs,
                "virtio_console": Param(str, "a --virtio-console endpoint"),
            },
        )
    )
    commands.register(
        Command(
            "boot",
            boot,
            "boot a guest in this VMM (as evmm run; the default guest without kernel=)",
            {
                "kernel": Param(str, "kernel image"),
                "initrd": Param(str, "initramfs"),
                "append": Param(str, "kernel command line, added to the defaults"),
                "memory": Param(str, "guest RAM, e.g. 256M", default="256M"),
                "cpus": Param(int, "vCPUs", default=1, lo=1, hi=32),
                **specs,
                "rng": Param(bool, "a virtio-rng device", default=False),
            },
        )
    )


__all__ = ["ServedMachine", "register"]
