"""Module load order from modules.dep, and the apt-cache depends parser."""

from __future__ import annotations

import pytest

from evmm.assets.debian import parse_depends
from evmm.assets.modules import load_order, module_name, parse_builtin, parse_modules_dep
from evmm.errors import EvmmError

# Shaped like the cloud kernel's modules.dep (each line lists all of a module's dependencies).
MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
"""


def names(paths: list[str]) -> list[str]:
    return [module_name(p) for p in paths]


def test_dependencies_come_first_and_once() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    order = names(load_order(deps, ["virtio_mmio", "virtio_net", "virtio_rng"]))
    assert order == [
        "virtio_ring",
        "virtio",
        "virtio_mmio",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_rng",
    ]


def test_dash_and_underscore_name_the_same_module() -> None:
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert module_name("kernel/fs/9p/9p.ko.xz") == "9p"
    assert names(load_order(parse_modules_dep(MODULES_DEP), ["virtio-rng"]))[-1] == "virtio_rng"


def test_builtin_modules_are_skipped_and_unknown_ones_refused() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    builtin = parse_builtin("kernel/net/packet/af_packet.ko\n")
    assert load_order(deps, ["af_packet"], builtin) == []
    with pytest.raises(EvmmError, match=r"kernel 6\.1 has no module vhost_vsock"):
        load_order(deps, ["vhost_vsock"], builtin, what="kernel 6.1")


def test_a_dependency_cycle_is_an_error() -> None:
    with pytest.raises(EvmmError, match="cycle"):
        load_order({"a.ko": ["b.ko"], "b.ko": ["a.ko"]}, ["a"])


def test_apt_cache_depends_parser() -> None:
    text = """\
iperf3
  PreDepends: init-system-helpers
  Depends: libc6
 |Depends: debconf
  Depends: <debconf-2.0>
    cdebconf
    debconf
  Depends: libiperf0
  Suggests: foo
libiperf0
  Depends: libc6
  Depends: libsctp1
"""
    assert parse_depends(text) == {
        "iperf3": ["init-system-helpers", "libc6", "debconf", "libiperf0"],
        "libiperf0": ["libc6", "libsctp1"],
    }
