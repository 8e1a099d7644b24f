"""Fakes for the PCI models: an MSI sink that records routes and messages, and a config-space harness."""

from __future__ import annotations


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
