"""Guest assets built from Debian packages: the default guest kernel and initramfs (``evmm assets``)."""

from __future__ import annotations

from evmm.assets.guest import GuestAssets, build_default_guest, default_guest

__all__ = ["GuestAssets", "build_default_guest", "default_guest"]
