"""virtio-vsock with a hybrid (Unix-socket) host side.  ``make_vsock`` is the only way the board builds one."""

from __future__ import annotations

from evmm.devices.virtio.device import VirtioDevice
from evmm.devices.virtio.vsock.device import VirtioVsock
from evmm.devices.virtio.vsock.muxer import VsockMuxer
from evmm.devices.virtio.vsock.unix import HybridListener, listen_unix
from evmm.errors import ConfigError
from evmm.machine.devspec import VsockSpec


def make_vsock(spec: VsockSpec) -> VirtioDevice:
    """A vsock device for ``--vsock``: listens on ``spec.path`` now, so a bad path fails before boot."""
    if spec.vhost:
        raise ConfigError(
            "--vsock vhost=on: /dev/vhost-vsock is not supported yet; use the Unix-socket host side (path=SOCK)"
        )
    sock = listen_unix(spec.path, "--vsock", port_suffix=True)
    return VirtioVsock(VsockMuxer(spec.cid, spec.path, HybridListener(sock, spec.path)))


__all__ = ["VirtioVsock", "make_vsock"]
