"""Fakes for the PCI models: an MSI sink that records routes and messages, and a VM that records MSI routes
and irqfds."""

from __future__ import annotations

from evmm.kvm.vm import GsiRoute


class RecordingMsiSink:
    """What the MSI-X model asked of KVM: ``("route", vector, address, data)`` and ``("fire", vector)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | str, ...]] = []
        self.routes: dict[int, tuple[int, int]] = {}

    def route(self, vector: int, address: int, data: int) -> None:
        self.calls.append(("route", vector, address, data))
        self.routes[vector] = (address, data)

    def fire(self, vector: int) -> None:
        self.calls.append(("fire", vector))

    def fired(self) -> list[int]:
        return [int(c[1]) for c in self.calls if c[0] == "fire"]

    def take(self) -> list[tuple[int | str, ...]]:
        calls, self.calls = self.calls, []
        return calls


class RoutingRecordingVm:
    """The ``RoutingVm`` of the MSI glue: every routing table set, and the live irqfds."""

    def __init__(self) -> None:
        self.tables: list[list[GsiRoute]] = []
        self.irqfds: dict[int, int] = {}  # eventfd -> GSI
        self.irqfd_calls = 0

    def set_gsi_routing(self, routes: list[GsiRoute]) -> None:
        self.tables.append(list(routes))

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        self.irqfd_calls += 1
        if deassign:
            assert self.irqfds.pop(fd) == gsi
        else:
            assert fd not in self.irqfds
            self.irqfds[fd] = gsi

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        return {r.gsi: r.msi for r in self.tables[-1] if r.msi is not None}
