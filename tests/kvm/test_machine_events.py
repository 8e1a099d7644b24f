"""The real ``Machine`` announces its own lifecycle and slot changes, once each change, through the control core.

The control plane relays machine events and never adds its own (the fake machine of the unit tests mirrors
this): so the events a client sees are exactly what ``Machine`` emits, checked here on a tiny guest.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from evmm.control import Commands
from evmm.machine.hotplug import HotplugSlot, make_empty_blk
from tests.kvm.tiny import tiny_guest

SPIN = bytes.fromhex("ebfe")  # jmp $


def test_pause_and_resume_are_announced_once_by_the_machine() -> None:
    with tiny_guest(SPIN) as t:
        events: list[tuple[str, Any]] = []
        t.machine.subscribe(lambda name, data: events.append((name, data.get("state"))))
        commands = Commands(t.machine)

        async def scenario() -> None:
            runner = asyncio.ensure_future(t.machine.run())
            await asyncio.sleep(0.1)
            assert await commands.call("pause", client="test") == {"state": "paused"}
            assert await commands.call("pause", client="test") == {"state": "paused"}  # no change, no event
            assert await commands.call("resume", client="test") == {"state": "running"}
            await commands.call("quit", client="test")
            await runner

        t.loop.run_until_complete(asyncio.wait_for(scenario(), 20))
        assert events == [
            ("state-changed", "running"),
            ("state-changed", "paused"),
            ("state-changed", "running"),
            ("state-changed", "stopped"),
            ("shutdown", None),
        ]


def test_hot_replace_is_announced_once_by_the_machine() -> None:
    with tiny_guest(SPIN) as t, tempfile.TemporaryDirectory() as d:
        image = Path(d) / "disk.img"
        image.write_bytes(bytes(4096))
        t.machine.devices.slots.append(HotplugSlot("hp-blk0", "blk", make_empty_blk("hp-blk0")))
        events: list[tuple[str, dict[str, Any]]] = []
        t.machine.subscribe(lambda name, data: events.append((name, data)))
        commands = Commands(t.machine)

        async def scenario() -> None:
            await commands.call("device-replace", {"slot": "hp-blk0", "path": str(image)}, client="test")
            await commands.call("device-remove", {"slot": "hp-blk0"}, client="test")

        t.loop.run_until_complete(asyncio.wait_for(scenario(), 20))
        assert events == [
            (
                "device-changed",
                {"slot": "hp-blk0", "kind": "blk", "action": "replaced", "backend": str(image)},
            ),
            ("device-changed", {"slot": "hp-blk0", "kind": "blk", "action": "removed", "backend": None}),
        ]
