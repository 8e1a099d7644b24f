"""Control methods of the standard board's PCI hotplug, registered on the command core by ``evmm run``:

    device-add  kind=blk|net id=NAME path=IMAGE [readonly] | tap=TAP [mac=M]
                plug a virtio-blk or virtio-net device into a free slot; the guest is told at once
    device-del  id=NAME [timeout=S]
                ask the guest to eject it and wait until it has (30 s by default); on timeout the device
                stays, the request stands, and a later eject by the guest still removes it
    query-pci   bus 0 as lspci would list it

QMP reaches the same methods through ``device_add driver=virtio-blk-pci|virtio-net-pci`` and ``device_del``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from evmm.config.devspec import DriveSpec, NetSpec
from evmm.control.commands import Call, Command, CommandError, Commands, Param, device_spec
from evmm.rpc.protocol import ErrorCode

DEFAULT_TIMEOUT = 30  # seconds: acpiphp unbinds the driver and calls _EJ0 in well under one, even nested


@runtime_checkable
class PciMachine(Protocol):
    """What these methods use of ``Machine`` (a board with a PCI bus)."""

    def pci_add(self, name: str, spec: DriveSpec | NetSpec) -> dict[str, Any]: ...

    async def pci_remove(self, name: str, timeout: float) -> dict[str, Any]: ...

    def pci_topology(self) -> list[dict[str, Any]]: ...


def register_pci_commands(commands: Commands) -> None:
    def machine(method: str) -> PciMachine:
        if not isinstance(commands.machine, PciMachine):
            raise CommandError(ErrorCode.FAILED, f"{method}: this machine has no PCI bus")
        return commands.machine

    async def add(call: Call) -> dict[str, Any]:
        p = call.params
        spec = device_spec(call.method, p["kind"], f"kind={p['kind']} is a", p, noun="")
        return machine(call.method).pci_add(p["id"], spec)

    async def delete(call: Call) -> dict[str, Any]:
        name, timeout = call.params["id"], call.params["timeout"]
        try:
            return await machine(call.method).pci_remove(name, timeout)
        except TimeoutError:
            raise CommandError(
                ErrorCode.FAILED,
                f"{call.method}: the guest did not eject {name} within {timeout} s; it stays attached, and "
                "the eject request stands",
            ) from None

    async def query(call: Call) -> dict[str, Any]:
        return {"devices": machine(call.method).pci_topology()}

    commands.register(
        Command(
            "device-add",
            add,
            "hot-add a virtio-blk (path) or virtio-net (tap) device on the PCI bus (--machine standard)",
            {
                "kind": Param(str, "blk or net", required=True, choices=("blk", "net")),
                "id": Param(str, "the device's name, for device-del", required=True),
                "path": Param(str, "disk image, for kind=blk"),
                "readonly": Param(bool, "read-only disk", default=False),
                "tap": Param(str, "tap interface, for kind=net"),
                "mac": Param(str, "MAC address for kind=net, e.g. 52:54:00:12:34:56"),
            },
        )
    )
    commands.register(
        Command(
            "device-del",
            delete,
            "ask the guest to eject a PCI device and wait until it has",
            {
                "id": Param(str, "the device's name", required=True),
                "timeout": Param(
                    int, "seconds to wait for the guest", default=DEFAULT_TIMEOUT, lo=1, hi=3600
                ),
            },
        )
    )
    commands.register(Command("query-pci", query, "the PCI bus: each slot's IDs, BARs, MSI-X and device"))
