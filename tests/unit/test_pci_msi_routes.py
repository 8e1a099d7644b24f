"""MSI-X vectors in KVM: GSIs above the IOAPIC pins, one irqfd per vector, the whole routing table rewritten
only when a route changes, and everything released when the device goes."""

from __future__ import annotations

import os

import pytest

from evmm.arch.x86.irqroute import pc_gsi_routes
from evmm.devices.pci.config import ConfigSpace
from evmm.devices.pci.msix import Msix
from evmm.errors import ConfigError
from evmm.machine.msi import KVM_MAX_IRQ_ROUTES, GsiRouting, KvmMsiVectors
from tests.fakes.pci import RoutingRecordingVm


def read_eventfd(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_a_vector_gets_a_gsi_an_irqfd_and_a_route_on_first_use() -> None:
    vm = RoutingRecordingVm()
    routing = GsiRouting(vm, pc_gsi_routes())
    assert vm.tables == [pc_gsi_routes()]
    vectors = KvmMsiVectors(vm, routing)
    vectors.route(3, 0xFEE0_0000, 0x41)
    assert vectors.gsi(3) == 24  # the first GSI above the IOAPIC's 24 pins
    assert vm.tables[-1][: len(pc_gsi_routes())] == pc_gsi_routes()
    assert vm.msi_routes() == {24: (0xFEE0_0000, 0x41)}
    ((fd, gsi),) = vm.irqfds.items()
    assert gsi == 24
    vectors.fire(3)
    vectors.fire(3)
    assert read_eventfd(fd) == 2
    vectors.fire(7)  # never routed: nothing to send
    vectors.close()
    assert vm.irqfds == {} and vm.msi_routes() == {}


def test_the_table_is_rewritten_only_when_a_route_changes() -> None:
    vm = RoutingRecordingVm()
    routing = GsiRouting(vm, [])
    vectors = KvmMsiVectors(vm, routing)
    vectors.route(0, 0xFEE0_0000, 0x30)
    vectors.route(0, 0xFEE0_0000, 0x30)
    assert len(vm.tables) == 2  # the empty base, then the one route
    vectors.route(0, 0xFEE0_1000, 0x30)
    assert vm.msi_routes() == {24: (0xFEE0_1000, 0x30)} and len(vm.tables) == 3
    assert vm.irqfd_calls == 1


def test_two_devices_share_the_table_and_a_released_gsi_is_reused() -> None:
    vm = RoutingRecordingVm()
    routing = GsiRouting(vm, [])
    a, b = KvmMsiVectors(vm, routing), KvmMsiVectors(vm, routing)
    a.route(0, 0xFEE0_0000, 0x30)
    b.route(0, 0xFEE0_0000, 0x31)
    b.route(1, 0xFEE0_0000, 0x32)
    assert vm.msi_routes() == {24: (0xFEE0_0000, 0x30), 25: (0xFEE0_0000, 0x31), 26: (0xFEE0_0000, 0x32)}
    a.close()
    assert vm.msi_routes() == {25: (0xFEE0_0000, 0x31), 26: (0xFEE0_0000, 0x32)}
    c = KvmMsiVectors(vm, routing)
    c.route(0, 0xFEE0_0000, 0x33)
    assert c.gsi(0) == 24
    b.close()
    c.close()


def test_running_out_of_routes_is_one_line() -> None:
    routing = GsiRouting(RoutingRecordingVm(), [])
    for _ in range(KVM_MAX_IRQ_ROUTES - 24):
        routing.allocate()
    with pytest.raises(ConfigError, match="all 4072 MSI routes are in use"):
        routing.allocate()
    with pytest.raises(ConfigError, match="GSI 5 was not allocated"):
        routing.set_msi(5, 0, 0)


def test_the_msix_model_drives_kvm_only_for_unmasked_vectors() -> None:
    vm = RoutingRecordingVm()
    vectors = KvmMsiVectors(vm, GsiRouting(vm, []))
    msix = Msix(2, vectors)
    cfg = ConfigSpace()
    cap = msix.add_capability(cfg, bar=0, table_offset=0, pba_offset=0x800)
    cfg.write(cap + 2, 2, 0x8000)  # enable
    msix.table_write(0, 8, 0xFEE0_0000)
    msix.table_write(8, 4, 0x45)
    msix.trigger(0)  # masked: no route, no irqfd yet
    assert vm.irqfds == {} and vm.msi_routes() == {}
    msix.table_write(12, 4, 0)
    assert vm.msi_routes() == {24: (0xFEE0_0000, 0x45)}
    ((fd, _),) = vm.irqfds.items()
    assert read_eventfd(fd) == 1
    vectors.close()
