"""``EVMM_JAIL=1``: the linux tier with every ``evmm run`` a test launches run under ``evmm jail`` instead
(issue 19: the device suite passes jailed, under a cgroup ``memory.max``).  docs/testing.md tells how to run it.

The ``launch`` fixture (tests/conftest.py) hands every argv to ``Jails.wrap``, which turns

    [ip netns exec NS] [env K=V ...] python -m evmm run RUN_ARGS
into
    [env K=V ...] python -m evmm jail --id ID --uid 65534 --gid 65534 --memory-max M [--netns /run/netns/NS]
        ... -- RUN_ARGS

and makes what the test gave the VMM usable by the jail's unprivileged user, never by running it as root:

- drives and shared directories are chowned to it (Firecracker's jailer asks the same of its drives);
- each tap is made beforehand in the test's namespace, owned by it: only CAP_NET_ADMIN creates a tap, its
  owner may attach to it (Documentation/networking/tuntap.rst); multi-queue where the VMM will attach several
  queue pairs;
- ``ip netns exec NS`` becomes the jail's own ``--netns /run/netns/NS``: ``ip netns exec`` remounts /sys,
  which hides the cgroup2 mount the jail makes its cgroup in;
- each socket the VMM listens on is made inside the jail's root (``outside(spec, PATH)`` on the host), and a
  symlink at PATH leads there.  A symlink rather than a rewritten argument: the VMM keeps the path it was
  given (the jail's own rule: no argument is rewritten) and every test keeps connecting to the path it gave.
  The one thing a symlink cannot do is the other direction, a host socket the VMM connects to (hybrid vsock's
  ``PATH_PORT``): it must be in the jail's root, so ``unix_listener`` makes it there.

``memory.max`` is the guest's memory plus ``VMM_ALLOWANCE``.  Tests the mode cannot support carry
``@pytest.mark.no_jail(reason)`` and are skipped (tests/linux/conftest.py); any other argv this cannot jail
(QEMU, say) is an error, so that no test passes unjailed in this mode.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from evmm.confine.cgroup import Limits
from evmm.confine.jail import JailSpec, cleanup, jail_argv, outside, run_config, sockets
from evmm.devices.virtio.net import MAX_QUEUE_PAIRS, VHOST_NET_PATH
from evmm.machine.config import MachineConfig
from evmm.netns import ip

ENV = "EVMM_JAIL"
UID = GID = 65534  # nobody / nogroup
BASE = Path("/tmp/evmm-jails")  # the test host's own tmpfs, as every other file a test makes
CGROUP_PARENT = "evmm-test"
# The VMM's own memory beside its guest's (Python, uvloop, its threads), plus what it writes to files on tmpfs:
# the test host's /tmp is RAM, charged to the writing cgroup and, without swap, never reclaimed.  Measured
# peaks of a jail's cgroup in the test host: 104-136 MiB with a 256 MiB guest doing small I/O, 288 MiB in
# virtio-blk's 64 MiB write test.
VMM_ALLOWANCE = 256 << 20
RUN = ("-m", "evmm", "run")
_ids = itertools.count()
_active: list[Jail] = []  # the running test's jails, for ``vmm_side``


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


class NotJailable(Exception):
    """An argv this mode cannot run in a jail: the test must be marked ``no_jail``."""


class Jail:
    """One jailed VMM: its spec and what the wrapper made for it on the host."""

    def __init__(self, spec: JailSpec, socket_dirs: set[Path]) -> None:
        self.spec = spec
        self.socket_dirs = socket_dirs
        self.links: list[Path] = []
        self.host_taps: list[str] = []  # taps made in this namespace (those in a test's netns go with it)


class Jails:
    """The jails of one test: made by ``wrap``, removed by ``close`` whatever state the test left them in."""

    def __init__(self) -> None:
        self.jails: list[Jail] = []

    def wrap(self, argv: Sequence[str], name: str) -> list[str]:
        prefix, netns, run_args = _split(argv)
        config = run_config(run_args)
        spec = JailSpec(
            id=f"{re.sub(r'[^A-Za-z0-9_.-]', '-', name)[:24]}-{os.getpid()}-{next(_ids)}",
            uid=UID,
            gid=GID,
            run_args=tuple(run_args),
            base=BASE,
            cgroup_parent=CGROUP_PARENT,
            limits=Limits(memory=config.memory + VMM_ALLOWANCE),
            netns=f"/run/netns/{netns}" if netns is not None else None,
        )
        paths = [_absolute(p) for p in sockets(run_args)]
        jail = Jail(spec, {p.parent for p in paths})
        self.jails.append(jail)
        _active.append(jail)
        for drive in config.drives:
            os.chown(_absolute(drive.path), UID, GID)
        for fs in config.fss:
            _chown_tree(_absolute(fs.path))
        _make_taps(jail, config, netns)
        for path in paths:
            path.symlink_to(outside(spec, path))
            jail.links.append(path)
        return [*prefix, *jail_argv(spec)]

    def close(self) -> None:
        """After the test's VMMs are killed: the jails' leftovers (after a SIGKILL), links and taps."""
        for jail in self.jails:
            _active.remove(jail)
            cleanup(jail.spec.id, jail.spec.base, jail.spec.cgroup_parent)
            for link in jail.links:
                if link.is_symlink():
                    link.unlink()
            for tap in jail.host_taps:
                ip("link", "del", tap)
        self.jails.clear()


def _split(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """``[ip netns exec NS] [env K=V ...] PYTHON -m evmm run ARGS``: the env prefix, NS and ARGS."""
    rest = list(argv)
    netns = None
    if rest[:3] == ["ip", "netns", "exec"] and len(rest) > 3:
        netns, rest = rest[3], rest[4:]
    prefix = []
    if rest[:1] == ["env"]:
        prefix.append(rest.pop(0))
        while rest and "=" in rest[0]:
            prefix.append(rest.pop(0))
    if len(rest) < 4 or rest[0] != sys.executable or tuple(rest[1:4]) != RUN:
        raise NotJailable(
            f"{ENV}=1 runs every `evmm run` in a jail, and cannot run `{' '.join(argv[:6])} ...`: "
            "mark the test @pytest.mark.no_jail(reason)"
        )
    return prefix, netns, rest[4:]


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


def _chown_tree(top: Path) -> None:
    """The shared directory and everything in it, symlinks themselves (never what they point at)."""
    os.chown(top, UID, GID)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), UID, GID, follow_symlinks=False)


def _make_taps(jail: Jail, config: MachineConfig, netns: str | None) -> None:
    # evmm.devices.virtio.net.make_net: with vhost-net, a queue pair per vCPU on a multi-queue tap.
    vhost = [n.vhost is True or (n.vhost is None and Path(VHOST_NET_PATH).exists()) for n in config.nets]
    for net, with_vhost in zip(config.nets, vhost, strict=True):
        if net.tap is None:
            continue
        where = ("-n", netns) if netns is not None else ()
        try:
            ip(*where, "link", "show", "dev", net.tap)
            continue  # the test made it itself, for whom it chose
        except OSError:
            pass
        queues = ("multi_queue",) if with_vhost and min(config.cpus, MAX_QUEUE_PAIRS) > 1 else ()
        ip(
            *where,
            "tuntap",
            "add",
            "dev",
            net.tap,
            "mode",
            "tap",
            "user",
            str(UID),
            "group",
            str(GID),
            *queues,
        )
        if netns is None:
            jail.host_taps.append(net.tap)


def vmm_side(path: str | Path) -> Path:
    """Where the VMM finds host path ``path``: itself, or in jail mode, for a path beside one of a running
    jail's sockets, the same path in that jail's root."""
    p = _absolute(Path(path))
    for jail in _active:
        if p.parent in jail.socket_dirs:
            return outside(jail.spec, p)
    return p


def unix_listener(path: str | Path, backlog: int = 8) -> socket.socket:
    """A Unix stream socket listening at ``path`` for the VMM to connect to (hybrid vsock's PATH_PORT)."""
    where = vmm_side(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(where))
        if where != _absolute(Path(path)):
            # connect(2) needs write permission on the socket (unix(7)): the jail's user is not root.
            os.chown(where, UID, GID)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s
