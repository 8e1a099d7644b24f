"""QMP's device vocabulary over evmm's hot-replace slots: QEMU's names kept, and what uses what.

QEMU builds a disk from a block node and a device that uses it (``blockdev-add node-name=N``, then
``device_add driver=virtio-blk-device drive=N id=D``), a NIC from a netdev and a device (``netdev_add id=X
ifname=T``, then ``device_add ... netdev=X``), and ``device_del id=D`` takes the device away.  evmm's microvm has
hot-replace slots instead (docs/control-protocol.md).  ``DeviceBook`` remembers the nodes, netdevs and devices
QMP clients named, refuses what QEMU refuses (a duplicate name, a node in use), and turns a ``device_add`` into
the core's ``device-replace`` parameters for a free slot.  It is pure: ``QmpServer`` asks the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from evmm.control.commands import Param
from evmm.record import record
from evmm.rpc.qmp_wire import QmpError

BLK_DRIVERS = ("virtio-blk-device", "virtio-blk-mmio")
NET_DRIVERS = ("virtio-net-device", "virtio-net-mmio")

# Each command's arguments, by QEMU's names.  blockdev-add takes QEMU's form {"driver": "raw", "file":
# {"driver": "file", "filename": F}} and the flat {"driver": "file", "filename": F}; StratoVirt's adds "cache",
# which a raw image file ignores here.
_FILE = {"driver": Param(str, required=True), "filename": Param(str, required=True), "aio": Param(str)}
ARGS: dict[str, Mapping[str, Param]] = {
    "blockdev-add": {
        "node-name": Param(str, required=True),
        "driver": Param(str),
        "file": Param(dict, fields=_FILE),
        "filename": Param(str),
        "read-only": Param(bool, default=False),
        "cache": Param(dict),
    },
    "blockdev-del": {"node-name": Param(str, required=True)},
    "netdev_add": {
        "id": Param(str, required=True),
        "type": Param(str, default="tap"),
        "ifname": Param(str, required=True),
        "script": Param(str, default="no"),
        "downscript": Param(str, default="no"),
    },
    "netdev_del": {"id": Param(str, required=True)},
    "device_add": {
        "driver": Param(str, required=True),
        "id": Param(str, required=True),
        "drive": Param(str),
        "netdev": Param(str),
        "mac": Param(str),
    },
    "device_del": {"id": Param(str, required=True)},
}


def _fail(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


@record
class Node:
    """A ``blockdev-add`` image."""

    path: str
    readonly: bool
    user: str | None = None  # the device id using it


@record
class Netdev:
    """A ``netdev_add`` tap."""

    ifname: str
    user: str | None = None


_B = TypeVar("_B", Node, Netdev)


def _unused(table: Mapping[str, _B], name: str, missing: str, busy: Callable[[str], str]) -> _B:
    """``table[name]`` when no device uses it; else ``QmpError(missing)`` or ``QmpError(busy(user))``."""
    entry = table.get(name)
    if entry is None:
        raise _fail(missing)
    if entry.user is not None:
        raise _fail(busy(entry.user))
    return entry


@record(frozen=True)
class Device:
    """A ``device_add``-ed device: the slot it fills and the node or netdev it uses."""

    slot: str
    kind: str  # "blk" or "net", as the slot's
    backend: str


@record(frozen=True)
class Plan:
    """What a ``device_add`` asks of the core: a free slot of ``kind``, filled with ``params``."""

    kind: str
    params: dict[str, Any]
    backend: str


class DeviceBook:
    """The QMP names of one machine's hot-replace backends and devices (args checked against ``ARGS``)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.netdevs: dict[str, Netdev] = {}
        self.devices: dict[str, Device] = {}

    # ---- backends -------------------------------------------------------------------------------------------

    def add_node(self, a: Mapping[str, Any]) -> None:
        node = a["node-name"]
        if node in self.nodes:
            raise _fail(f"Duplicate nodes with node-name='{node}'")
        driver = a["driver"] or ("raw" if a["file"] is not None else "file")
        if driver not in ("raw", "file"):
            raise _fail(f"blockdev-add: driver '{driver}' is not supported (raw or file)")
        if a["file"] is not None:
            if a["file"]["driver"] != "file" or a["filename"] is not None:
                raise _fail("blockdev-add: give file: {driver: file, filename: PATH}")
            filename = a["file"]["filename"]
        elif a["filename"] is not None:
            filename = a["filename"]
        else:
            raise _fail("Parameter 'filename' is missing")
        self.nodes[node] = Node(filename, a["read-only"])

    def del_node(self, a: Mapping[str, Any]) -> None:
        node = a["node-name"]
        missing = f"Failed to find node with node-name='{node}'"
        _unused(self.nodes, node, missing, lambda user: f"Node '{node}' is busy: device {user} uses it")
        del self.nodes[node]

    def add_netdev(self, a: Mapping[str, Any]) -> None:
        if a["type"] != "tap":
            raise _fail(f"netdev_add: type '{a['type']}' is not supported (tap)")
        if a["script"] != "no" or a["downscript"] != "no":
            raise _fail("netdev_add: evmm runs no scripts: give script=no, downscript=no")
        if a["id"] in self.netdevs:
            raise _fail(f"Duplicate ID '{a['id']}' for netdev")
        self.netdevs[a["id"]] = Netdev(a["ifname"])

    def del_netdev(self, a: Mapping[str, Any]) -> None:
        nid = a["id"]
        _unused(
            self.netdevs,
            nid,
            f"Device '{nid}' not found",
            lambda user: f"netdev '{nid}' is used by device {user}",
        )
        del self.netdevs[nid]

    # ---- devices ----------------------------------------------------------------------------------------------

    def plan(self, a: Mapping[str, Any]) -> Plan:
        """What a ``device_add`` needs, or ``QmpError`` naming what is wrong with it."""
        if a["id"] in self.devices:
            raise _fail(f"Duplicate device ID '{a['id']}'")
        driver = a["driver"]
        if driver in BLK_DRIVERS:
            return self._drive(a)
        if driver in NET_DRIVERS:
            return self._nic(a)
        raise _fail(
            f"device_add: driver '{driver}' is not supported ({', '.join(BLK_DRIVERS + NET_DRIVERS)})"
        )

    def _drive(self, a: Mapping[str, Any]) -> Plan:
        if a["drive"] is None or a["netdev"] is not None or a["mac"] is not None:
            raise _fail("device_add: a virtio-blk device takes drive=NODE (from blockdev-add)")
        name = a["drive"]
        missing = f"Drive '{name}' not found (blockdev-add it first)"
        node = _unused(self.nodes, name, missing, lambda user: f"Drive '{name}' is already in use by {user}")
        return Plan("blk", {"path": node.path, "readonly": node.readonly}, name)

    def _nic(self, a: Mapping[str, Any]) -> Plan:
        if a["netdev"] is None or a["drive"] is not None:
            raise _fail("device_add: a virtio-net device takes netdev=ID (from netdev_add)")
        name = a["netdev"]
        missing = f"Netdev '{name}' not found (netdev_add it first)"
        netdev = _unused(
            self.netdevs, name, missing, lambda user: f"Netdev '{name}' is already in use by {user}"
        )
        params: dict[str, Any] = {"tap": netdev.ifname}
        if a["mac"] is not None:
            params["mac"] = a["mac"]
        return Plan("net", params, name)

    @staticmethod
    def free_slot(plan: Plan, slots: list[dict[str, Any]]) -> str:
        """The first empty slot (as ``query-hotplug`` lists them) of the plan's kind."""
        for slot in slots:
            if slot.get("kind") == plan.kind and not slot.get("occupied"):
                return str(slot["id"])
        raise _fail(f"device_add: no free {plan.kind} hot-replace slot (evmm run --hotplug {plan.kind}=N)")

    def attach(self, dev: str, slot: str, plan: Plan) -> None:
        """``dev`` now fills ``slot`` (the core said yes)."""
        self.devices[dev] = Device(slot, plan.kind, plan.backend)
        self._backend(self.devices[dev]).user = dev

    def slot_of(self, dev: str) -> str:
        entry = self.devices.get(dev)
        if entry is None:
            raise QmpError("DeviceNotFound", f"Device '{dev}' not found")
        return entry.slot

    def detach(self, dev: str) -> None:
        """``dev``'s slot is empty (the core said yes); its node or netdev is free again."""
        entry = self.devices.pop(dev)
        self._backend(entry).user = None

    def _backend(self, device: Device) -> Node | Netdev:
        return self.nodes[device.backend] if device.kind == "blk" else self.netdevs[device.backend]

    def device_in(self, slot: str) -> str | None:
        """The QMP id of the device in ``slot``, if a QMP client put one there."""
        return next((d for d, entry in self.devices.items() if entry.slot == slot), None)

    # ---- query-block ------------------------------------------------------------------------------------------

    def query_block(self, devices: list[dict[str, Any]], slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """QEMU's BlockInfo list: cold-plugged disks (``device_list`` entries that describe themselves with
        kind/path, see docs/control-protocol.md) and the block slots, under their QMP names where they have one.
        """
        out: list[dict[str, Any]] = []
        slot_ids = {s.get("id") for s in slots}
        for dev in devices:
            if dev.get("kind") == "blk" and dev.get("path") and dev.get("id") not in slot_ids:
                name = str(dev.get("id") or dev["name"])
                out.append(_block_info(name, str(dev["path"]), bool(dev.get("readonly")), None))
        for slot in slots:
            if slot.get("kind") != "blk":
                continue
            qdev = self.device_in(str(slot["id"])) or str(slot["id"])
            entry = self.devices.get(qdev)
            node = self.nodes.get(entry.backend) if entry is not None else None
            readonly = node.readonly if node is not None else False
            out.append(_block_info(qdev, slot.get("backend"), readonly, entry.backend if entry else None))
        return out


def _block_info(qdev: str, path: str | None, readonly: bool, node: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": "",
        "qdev": qdev,
        "locked": False,
        "removable": False,
        "type": "unknown",
    }
    if path:
        info["inserted"] = {
            "file": path,
            "node-name": node or qdev,
            "ro": readonly,
            "drv": "raw",
            "encrypted": False,
            "backing_file_depth": 0,
            "detect_zeroes": "off",
        }
    return info
