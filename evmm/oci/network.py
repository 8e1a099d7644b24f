"""The container's network namespace, carried into its VM as Kata carries it (its "tcfilter" model).

The engine gives the container a network namespace with a veth in it (docker through its prestart hook,
podman and CNI before ``create``).  The monitor lives in that namespace and opens a tap there; tc moves every
frame arriving on the veth to the tap and every frame from the tap to the veth (an ingress qdisc with a u32
match-all filter and a mirred egress redirect, each way), so the guest's NIC stands in for the veth.  The
guest's NIC gets the veth's MAC (the bridge and its neighbours already know it), and the agent gives it the
veth's addresses, MTU and routes (busybox ``ip`` in the guest).  The veth keeps its addresses: the frames
never reach the namespace's own stack, and the engine may still read them there.

Parsing ``ip -j`` output is pure; the rest runs ``ip`` and ``tc`` (iproute2) in the current namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from evmm.errors import EvmmError
from evmm.record import record

CLONE_NEWNET = 0x40000000  # <sched.h>
TAP = "tap0_evmm"  # the tap's name in the container's namespace
GUEST_NIC = "eth0"  # the first virtio-net device in the guest


@record(frozen=True)
class Interface:
    name: str
    mac: str
    mtu: int
    addresses: tuple[str, ...]  # "10.88.0.5/16", "fd00::5/64": global and site scope, not link-local


@record(frozen=True)
class Route:
    dst: str  # "default" or a prefix
    dev: str
    gateway: str | None = None
    ipv6: bool = False


def parse_interfaces(text: str) -> list[Interface]:
    """``ip -j addr show``: the namespace's Ethernet interfaces (not loopback, not our own tap)."""
    out = []
    for link in _json_list(text, "ip -j addr"):
        if link.get("link_type") != "ether" or link.get("ifname") == TAP:
            continue
        addresses = tuple(
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info", [])
            if a.get("family") in ("inet", "inet6") and a.get("scope") != "link" and "local" in a
        )
        out.append(
            Interface(str(link["ifname"]), str(link["address"]), int(link.get("mtu", 1500)), addresses)
        )
    return out


def parse_routes(text: str, *, ipv6: bool = False) -> list[Route]:
    """``ip -j route show``: the routes the guest must add itself (the kernel adds its own link routes)."""
    out = []
    for r in _json_list(text, "ip -j route"):
        if r.get("protocol") == "kernel" or "dev" not in r:
            continue
        out.append(Route(str(r["dst"]), str(r["dev"]), r.get("gateway"), ipv6))
    return out


def _json_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text) if text.strip() else []
    except ValueError as e:
        raise EvmmError(f"{what}: output is not JSON ({e})") from None
    if not isinstance(value, list):
        raise EvmmError(f"{what}: output is not a JSON list")
    return [v for v in value if isinstance(v, dict)]


def guest_commands(iface: Interface, routes: Sequence[Route], nic: str = GUEST_NIC) -> list[list[str]]:
    """The busybox ``ip`` commands that make the guest's NIC the veth ``iface`` (its MAC is set by the VMM)."""
    cmds = [["ip", "link", "set", nic, "mtu", str(iface.mtu)]]
    for addr in iface.addresses:
        cmds.append(["ip", "-6" if ":" in addr else "-4", "addr", "add", addr, "dev", nic])
    cmds.append(["ip", "link", "set", nic, "up"])
    for r in routes:
        if r.dev != iface.name:
            continue
        cmd = ["ip", "-6" if r.ipv6 else "-4", "route", "add", r.dst]
        if r.gateway:
            cmd += ["via", r.gateway]
        cmds.append([*cmd, "dev", nic])
    return cmds


def redirect_commands(veth: str, tap: str) -> list[list[str]]:
    """tc: everything arriving on ``veth`` leaves through ``tap`` and the other way round (tc-mirred(8))."""
    cmds = []
    for src, dst in ((veth, tap), (tap, veth)):
        cmds += [
            ["tc", "qdisc", "add", "dev", src, "ingress"],
            [
                *("tc", "filter", "add", "dev", src, "parent", "ffff:", "protocol", "all"),
                *("u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", dst),
            ],
        ]
    return cmds


# ---- in the current namespace --------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter(path: str | None) -> None:
    """Join the network namespace at ``path``, or make a new one (loopback up) when ``path`` is None.

    Called by the monitor before it starts any thread: setns/unshare move only the calling thread.
    """
    libc = _libc()
    if path is None:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise EvmmError(f"cannot make a network namespace: {os.strerror(ctypes.get_errno())}")
        run(["ip", "link", "set", "lo", "up"])
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise EvmmError(f"network namespace {path}: {e.strerror}") from None
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise EvmmError(f"cannot join the network namespace {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def run(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as e:
        raise EvmmError(f"cannot run {argv[0]}: {e.strerror} (iproute2 installed?)") from None
    if r.returncode != 0:
        raise EvmmError(f"{' '.join(argv)}: {r.stderr.strip() or f'exit status {r.returncode}'}")
    return r.stdout


def discover() -> tuple[list[Interface], list[Route]]:
    interfaces = parse_interfaces(run(["ip", "-j", "addr", "show"]))
    routes = parse_routes(run(["ip", "-j", "-4", "route", "show"])) + parse_routes(
        run(["ip", "-j", "-6", "route", "show"]), ipv6=True
    )
    return interfaces, routes


def plumb(veth: Interface, tap: str = TAP) -> None:
    """A tap next to ``veth``, joined to it, up with the veth's MTU.

    The tap is made persistent here, so that the redirect can point at it before the VMM (started in this
    namespace) attaches to it by name; ``unplumb`` deletes it, and if the monitor is killed first, it goes
    with the namespace.
    """
    run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    try:
        run(["ip", "link", "set", tap, "mtu", str(veth.mtu), "up"])
        for cmd in redirect_commands(veth.name, tap):
            run(cmd)
    except EvmmError:
        unplumb(veth.name, tap)
        raise


def unplumb(veth: str, tap: str = TAP) -> None:
    """Undo ``plumb``; quiet about what is already gone."""
    for cmd in (["tc", "qdisc", "del", "dev", veth, "ingress"], ["ip", "link", "del", tap]):
        subprocess.run(cmd, capture_output=True, check=False)
