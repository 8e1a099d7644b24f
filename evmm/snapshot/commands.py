"""The ``snapshot`` control method (``evmm ctl SOCK snapshot dir=D``), registered on a machine's command core.

The VM must be paused (``pause``), and stays paused afterwards: the caller resumes it, or quits it, or keeps
it to clone again.  The method holds the lifecycle lock of pause and resume for its whole run, so no
``resume`` can start the vCPUs while the state is being saved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from evmm.control.commands import Call, Command, CommandError, Commands, Param
from evmm.machine.machine import Machine
from evmm.rpc.protocol import ErrorCode


def register(commands: Commands, machine: Callable[[], Machine | None]) -> None:
    """Add ``snapshot``; ``machine()`` is the machine to save (None: nothing runs yet, as in ``evmm serve``)."""

    async def snapshot(call: Call) -> dict[str, Any]:
        from evmm.snapshot.save import save_snapshot

        target = machine()
        if target is None:
            raise CommandError(ErrorCode.VM_STATE, "snapshot: there is no VM yet")
        async with commands._lifecycle:  # no resume while the state is taken
            if target.state != "paused":
                raise CommandError(ErrorCode.VM_STATE, f"snapshot: the VM is {target.state}; pause it first")
            info = await save_snapshot(
                target, Path(call.params["dir"]), copy_disks=call.params["disks"] == "copy"
            )
        target.emit("snapshot-saved", {"dir": str(info.directory)})
        return info.describe()

    commands.register(
        Command(
            "snapshot",
            snapshot,
            "save the paused VM to a directory (evmm run --restore DIR loads it); it stays paused",
            {
                "dir": Param(str, "the snapshot directory (created; its files are replaced)", required=True),
                "disks": Param(
                    str,
                    "keep: the restore uses the drives' images again; copy: the snapshot keeps a copy of each",
                    default="keep",
                    choices=("keep", "copy"),
                ),
            },
        )
    )


__all__ = ["register"]
