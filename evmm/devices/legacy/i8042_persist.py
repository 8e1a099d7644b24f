"""The i8042 controller's and keyboard's state for a snapshot (evmm/devices/legacy/i8042.py).

Everything in flight is kept: the output buffer, controller replies and keyboard bytes not yet read, a
command waiting for its data byte.  The IRQ 1 level is recomputed and driven onto the new VM's line.
"""

from __future__ import annotations

from typing import Any

from evmm.devices.legacy.i8042 import I8042
from evmm.snapshot.format import Fields, SnapshotError

VERSION = 1


def save(kbd: I8042) -> dict[str, Any]:
    with kbd._lock:
        return {
            "v": VERSION,
            "ram": bytes(kbd._ram),
            "sys": kbd._sys,
            "a2": kbd._a2,
            "outport": kbd._outport,
            "obf": kbd._obf,
            "last_out": kbd._last_out,
            "replies": bytes(kbd._replies),
            "kbd": bytes(kbd._kbd),
            "pending_cmd": kbd._pending_cmd,
            "xlate_break": kbd._xlate_break,
            "kbd_param_for": kbd._kbd_param_for,
            "kbd_set": kbd._kbd_set,
            "kbd_scanning": kbd._kbd_scanning,
            "kbd_last": kbd._kbd_last,
        }


def _opt_byte(f: Fields, key: str) -> int | None:
    return None if f.data.get(key) is None else f.integer(key, 0xFF)


def restore(kbd: I8042, data: object, where: str) -> None:
    f = Fields(data, where).version(VERSION)
    ram = f.blob("ram")
    if len(ram) != len(kbd._ram):
        raise SnapshotError(f"{where}: controller RAM is {len(ram)} bytes, not {len(kbd._ram)}")
    kbd_set = f.integer("kbd_set")
    if kbd_set not in (1, 2):
        raise SnapshotError(f"{where}: scancode set {kbd_set} is not 1 or 2")
    values = (
        f.boolean("sys"),
        f.boolean("a2"),
        f.integer("outport") & 0xFF,
        _opt_byte(f, "obf"),
        f.integer("last_out") & 0xFF,
        f.blob("replies"),
        f.blob("kbd"),
        _opt_byte(f, "pending_cmd"),
        f.boolean("xlate_break"),
        _opt_byte(f, "kbd_param_for"),
        f.boolean("kbd_scanning"),
        f.integer("kbd_last") & 0xFF,
    )
    with kbd._lock:
        kbd._ram[:] = ram
        (
            kbd._sys,
            kbd._a2,
            kbd._outport,
            kbd._obf,
            kbd._last_out,
            replies,
            keys,
            kbd._pending_cmd,
            kbd._xlate_break,
            kbd._kbd_param_for,
            kbd._kbd_scanning,
            kbd._kbd_last,
        ) = values
        kbd._replies.clear()
        kbd._replies.extend(replies)
        kbd._kbd.clear()
        kbd._kbd.extend(keys)
        kbd._kbd_set = kbd_set
        kbd._sync_line()
