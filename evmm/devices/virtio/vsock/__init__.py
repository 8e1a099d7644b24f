"""virtio-vsock, with a hybrid (Unix-socket) host side or the kernel's vhost-vsock.

``make_vsock`` is the only way the board builds one.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from evmm.config.devspec import VsockSpec
from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.vhost import open_error
from evmm.devices.virtio.vsock.device import VirtioVsock
from evmm.devices.virtio.vsock.muxer import VsockMuxer
from evmm.devices.virtio.vsock.unix import HybridListener, listen_unix
from evmm.devices.virtio.vsock.vhost import VhostVsock, VhostVsockBackend
from evmm.errors import ConfigError

VHOST_VSOCK_PATH = "/dev/vhost-vsock"  # evmm.vhost.vsock's, without loading the vhost bindings
VhostOpener = Callable[[], VhostVsockBackend]


def make_vsock(spec: VsockSpec, *, open_vhost: VhostOpener | None = None) -> VirtioDevice:
    """A vsock device for ``--vsock``, with its host side claimed now, so a bad one fails before boot.

    ``open_vhost`` opens /dev/vhost-vsock (tests pass a fake).
    """
    if spec.vhost:
        if open_vhost is None:
            from evmm.vhost.vsock import VhostVsockFd

            open_vhost = VhostVsockFd.open
        return _make_vhost(spec, open_vhost)
    if spec.path is None:
        raise ConfigError(f"--vsock cid={spec.cid}: path= is required (or vhost=on)")
    sock = listen_unix(spec.path, "--vsock", port_suffix=True)
    return VirtioVsock(VsockMuxer(spec.cid, spec.path, HybridListener(sock, spec.path)))


def _make_vhost(spec: VsockSpec, open_vhost: VhostOpener) -> VhostVsock:
    what = f"--vsock cid={spec.cid},vhost=on"
    try:
        backend = open_vhost()
    except OSError as e:
        raise open_error(what, VHOST_VSOCK_PATH, e, "use path=SOCK for a Unix-socket host side") from None
    try:
        device = VhostVsock(spec.cid, backend)
        backend.set_guest_cid(spec.cid)
    except OSError as e:
        backend.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{what}: CID {spec.cid} is already in use on this host (by another VM, or as this host's own "
                "vsock address): pick another cid="
            ) from None
        raise ConfigError(f"{what}: {e.strerror or e}") from None
    return device


__all__ = ["VhostVsock", "VirtioVsock", "make_vsock"]
