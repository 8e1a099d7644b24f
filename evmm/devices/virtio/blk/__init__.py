"""virtio-blk: a raw image file (or block device) as a guest disk (virtio 1.2 §5.2).

``make_blk`` is what the board builder calls for each ``--drive``; the parts are ``request`` (pure request
parsing), ``backend`` (the host file and the I/O threads) and ``device`` (the virtio device on the reactor).
"""

from __future__ import annotations

from evmm.config.devspec import DriveSpec
from evmm.devices.virtio.blk.backend import FileBackend
from evmm.devices.virtio.blk.device import VirtioBlk


def make_blk(spec: DriveSpec) -> VirtioBlk:
    """Open the drive's image; a missing, unreadable or unwritable image or a directory is a ``ConfigError``
    whose one line names the path."""
    backend = FileBackend.open(spec.path, spec.readonly)
    return VirtioBlk(backend, serial=spec.serial if spec.serial is not None else spec.id)


__all__ = ["VirtioBlk", "make_blk"]
