"""MSI-X vectors in KVM: each vector a GSI with an MSI route and an irqfd, on a routing table shared by the VM.

KVM_SET_GSI_ROUTING replaces the whole table, so one ``GsiRouting`` per VM holds it: the PC's irqchip routes
(arch/x86/irqroute.py) plus an MSI route (address, data) for each vector in use, on GSIs above the IOAPIC's
pins.  A vector gets its GSI and its irqfd the first time it is routed; sending it is then one eventfd
write, and KVM delivers the message to the LAPICs itself.  Masking and pending bits are the MSI-X model's
business (devices/pci/msix.py): it only routes and fires unmasked vectors.  Runs on the reactor.
"""

from __future__ import annotations

import os
from typing import Protocol

from evmm.arch.x86.layout import IOAPIC_PINS
from evmm.errors import ConfigError
from evmm.kvm.vm import GsiRoute

KVM_MAX_IRQ_ROUTES = 4096  # include/linux/kvm_host.h: the GSIs a routing table may name


class RoutingVm(Protocol):
    def set_gsi_routing(self, routes: list[GsiRoute]) -> None: ...

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None: ...


class GsiRouting:
    """The VM's GSI routing table: fixed irqchip routes and MSI routes allocated and changed at run time."""

    def __init__(self, vm: RoutingVm, base: list[GsiRoute]) -> None:
        self._vm = vm
        self._base = list(base)
        self._msi: dict[int, tuple[int, int] | None] = {}  # GSI -> (address, data); None until routed
        vm.set_gsi_routing(self._base)

    def allocate(self) -> int:
        gsi = next((g for g in range(IOAPIC_PINS, KVM_MAX_IRQ_ROUTES) if g not in self._msi), None)
        if gsi is None:
            raise ConfigError(f"all {KVM_MAX_IRQ_ROUTES - IOAPIC_PINS} MSI routes are in use")
        self._msi[gsi] = None
        return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        if gsi not in self._msi:
            raise ConfigError(f"GSI {gsi} was not allocated for MSI")
        if self._msi[gsi] != (address, data):
            self._msi[gsi] = (address, data)
            self._commit()

    def release(self, gsi: int) -> None:
        if self._msi.pop(gsi, None) is not None:
            self._commit()

    def _commit(self) -> None:
        msi = [
            GsiRoute(gsi, msi=message) for gsi, message in sorted(self._msi.items()) if message is not None
        ]
        self._vm.set_gsi_routing(self._base + msi)


class KvmMsiVectors:
    """An ``MsiSink`` for one device: vector -> (GSI, irqfd), made on first use, released by ``close``."""

    def __init__(self, vm: RoutingVm, routing: GsiRouting) -> None:
        self._vm = vm
        self._routing = routing
        self._vectors: dict[int, tuple[int, int]] = {}  # vector -> (GSI, eventfd)

    def route(self, vector: int, address: int, data: int) -> None:
        if vector not in self._vectors:
            gsi = self._routing.allocate()
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self._vm.irqfd(fd, gsi)
            except BaseException:
                os.close(fd)
                self._routing.release(gsi)
                raise
            self._vectors[vector] = (gsi, fd)
        self._routing.set_msi(self._vectors[vector][0], address, data)

    def fire(self, vector: int) -> None:
        entry = self._vectors.get(vector)
        if entry is not None:
            os.eventfd_write(entry[1], 1)

    def gsi(self, vector: int) -> int | None:
        entry = self._vectors.get(vector)
        return None if entry is None else entry[0]

    def close(self) -> None:
        for gsi, fd in self._vectors.values():
            self._vm.irqfd(fd, gsi, deassign=True)
            os.close(fd)
            self._routing.release(gsi)
        self._vectors.clear()
