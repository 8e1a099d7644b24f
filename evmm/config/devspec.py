"""Device options as users write them (``--drive path=disk.img,readonly=on``), parsed into typed specs.

Every mistake gets one line naming the option and the value: an unknown key, a missing required key, a bad
boolean or number.  Nothing here opens a file; the devices do, and report their own errors.
"""

from __future__ import annotations

import re
from pathlib import Path

from evmm.errors import ConfigError
from evmm.record import record

_TRUE = {"on", "yes", "true", "1"}
_FALSE = {"off", "no", "false", "0"}
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


def parse_kv(
    option: str, text: str, known: tuple[str, ...], *, positional: str | None = None
) -> dict[str, str]:
    """``k=v,k=v`` into a dict; a bare first word is taken as ``positional``'s value when given."""
    out: dict[str, str] = {}
    if not text:
        raise ConfigError(f"{option} needs a value (keys: {', '.join(known)})")
    for i, part in enumerate(text.split(",")):
        if "=" not in part:
            if i == 0 and positional is not None and part:
                out[positional] = part
                continue
            raise ConfigError(f"{option} {text!r}: {part!r} is not key=value (keys: {', '.join(known)})")
        key, value = part.split("=", 1)
        if key not in known:
            raise ConfigError(f"{option} {text!r}: unknown key {key!r} (keys: {', '.join(known)})")
        if key in out:
            raise ConfigError(f"{option} {text!r}: {key!r} given twice")
        out[key] = value
    return out


def parse_bool(option: str, key: str, value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{option}: {key}={value!r} is not on/off")


def parse_int(option: str, key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ConfigError(f"{option}: {key}={value!r} is not a number") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{option}: {key}={n} is out of range ({lo} to {hi})")
    return n


def _check_id(option: str, value: str) -> str:
    if not _ID_RE.match(value):
        raise ConfigError(f"{option}: id={value!r} must be a letter then up to 31 letters, digits, - or _")
    return value


@record(frozen=True)
class DriveSpec:
    path: Path
    readonly: bool = False
    id: str | None = None
    serial: str | None = None  # what VIRTIO_BLK_T_GET_ID returns; defaults to the id


def parse_drive(text: str) -> DriveSpec:
    kv = parse_kv("--drive", text, ("path", "readonly", "id", "serial"), positional="path")
    if "path" not in kv:
        raise ConfigError(f"--drive {text!r}: path= is required")
    return DriveSpec(
        path=Path(kv["path"]),
        readonly=parse_bool("--drive", "readonly", kv.get("readonly", "off")),
        id=_check_id("--drive", kv["id"]) if "id" in kv else None,
        serial=kv.get("serial"),
    )


@record(frozen=True)
class NetSpec:
    tap: str | None = None  # a tap interface to open (created if it does not exist)
    fd: int | None = None  # an already-open tap fd passed in by the caller
    mac: str | None = None
    id: str | None = None
    # The kernel's vhost-net moves the frames (on), or evmm (off); None: vhost where /dev/vhost-net opens.
    vhost: bool | None = None


def parse_net(text: str) -> NetSpec:
    kv = parse_kv("--net", text, ("tap", "fd", "mac", "id", "vhost"), positional="tap")
    if ("tap" in kv) == ("fd" in kv):
        raise ConfigError(f"--net {text!r}: give exactly one of tap=NAME or fd=N")
    tap = kv.get("tap")
    if tap is not None and not 0 < len(tap) < 16:
        raise ConfigError(f"--net: tap={tap!r} is not a valid interface name (1 to 15 characters)")
    mac = kv.get("mac")
    if mac is not None and not _MAC_RE.match(mac):
        raise ConfigError(f"--net: mac={mac!r} is not a MAC address like 52:54:00:12:34:56")
    if mac is not None and int(mac.split(":")[0], 16) & 1:
        raise ConfigError(f"--net: mac={mac} is a multicast address")
    return NetSpec(
        tap=tap,
        fd=parse_int("--net", "fd", kv["fd"], 0, 1 << 20) if "fd" in kv else None,
        mac=mac,
        id=_check_id("--net", kv["id"]) if "id" in kv else None,
        vhost=parse_bool("--net", "vhost", kv["vhost"]) if "vhost" in kv else None,
    )


@record(frozen=True)
class VsockSpec:
    cid: int
    path: Path | None = None  # host side: a Unix socket (hybrid vsock), PATH_<port> for guest connections
    vhost: bool = False  # or the kernel's /dev/vhost-vsock: host programs use AF_VSOCK sockets (CID 2)


def parse_vsock(text: str) -> VsockSpec:
    kv = parse_kv("--vsock", text, ("cid", "path", "vhost"))
    if "cid" not in kv:
        raise ConfigError(f"--vsock {text!r}: cid= is required")
    # CIDs 0-2 are reserved (hypervisor, local, host) and 0xFFFFFFFF is VMADDR_CID_ANY.
    cid = parse_int("--vsock", "cid", kv["cid"], 3, 0xFFFFFFFE)
    vhost = parse_bool("--vsock", "vhost", kv.get("vhost", "off"))
    if "path" not in kv and not vhost:
        raise ConfigError(f"--vsock {text!r}: path= is required (or vhost=on)")
    if "path" in kv and vhost:
        # With vhost the kernel carries every packet to AF_VSOCK sockets: no Unix socket could see them.
        raise ConfigError(
            f"--vsock {text!r}: path= and vhost=on exclude each other "
            "(with vhost=on, host programs use AF_VSOCK sockets, CID 2)"
        )
    return VsockSpec(cid=cid, path=Path(kv["path"]) if "path" in kv else None, vhost=vhost)


@record(frozen=True)
class ConsoleSpec:
    kind: str  # "stdio" (the terminal; the serial port then goes quiet), "pty", or "socket"
    path: Path | None = None  # the Unix socket to listen on, for "socket"


def parse_virtio_console(text: str) -> ConsoleSpec:
    if text == "stdio":
        return ConsoleSpec("stdio")
    if text == "pty":
        return ConsoleSpec("pty")
    if not text:
        raise ConfigError("--virtio-console needs stdio, pty or a socket PATH")
    return ConsoleSpec("socket", Path(text))


@record(frozen=True)
class RngSpec:
    rate: int | None = None  # bytes per second, None for unlimited


def parse_rng(text: str) -> RngSpec:
    if text in ("", "on"):
        return RngSpec()
    kv = parse_kv("--rng", text, ("rate",))
    return RngSpec(rate=parse_int("--rng", "rate", kv["rate"], 1, 1 << 30))


def parse_hotplug(text: str) -> tuple[int, int, bool | None]:
    """``blk=N,net=M[,vhost=on|off]``: how many empty hot-replace slots of each kind to reserve, and whether
    the NIC slots are vhost-net ones (None: where /dev/vhost-net opens), which is fixed at boot."""
    kv = parse_kv("--hotplug", text, ("blk", "net", "vhost"))
    return (
        parse_int("--hotplug", "blk", kv.get("blk", "0"), 0, 8),
        parse_int("--hotplug", "net", kv.get("net", "0"), 0, 8),
        parse_bool("--hotplug", "vhost", kv["vhost"]) if "vhost" in kv else None,
    )


_TAG_RE = re.compile(r"^[A-Za-z0-9._:@+-]{1,36}$")
FS_CACHE_MODES = ("none", "auto", "always")


@record(frozen=True)
class FsSpec:
    path: Path  # the host directory shared with the guest
    tag: str  # what the guest mounts: mount -t virtiofs TAG /mnt
    readonly: bool = False
    cache: str = "auto"  # none: ask the host every time; auto: trust for 1 s; always: trust until evicted


def parse_fs(text: str) -> FsSpec:
    kv = parse_kv("--fs", text, ("path", "tag", "readonly", "cache"))
    for key in ("path", "tag"):
        if key not in kv:
            raise ConfigError(f"--fs {text!r}: {key}= is required")
    if not _TAG_RE.match(kv["tag"]):
        # virtio 1.2 §5.11.4: up to 36 bytes, the guest's mount source; kept to characters a shell and
        # mount(8) take as they are.
        raise ConfigError(f"--fs: tag={kv['tag']!r} must be 1 to 36 letters, digits or ._:@+-")
    cache = kv.get("cache", "auto")
    if cache not in FS_CACHE_MODES:
        raise ConfigError(f"--fs: cache={cache!r} is not one of {', '.join(FS_CACHE_MODES)}")
    return FsSpec(
        path=Path(kv["path"]),
        tag=kv["tag"],
        readonly=parse_bool("--fs", "readonly", kv.get("readonly", "off")),
        cache=cache,
    )
