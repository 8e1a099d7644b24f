"""Recording interrupt fakes: what a device signalled, in order, without KVM."""

from __future__ import annotations


class RecordingIrqLine:
    """An ``IrqLine`` that remembers every level change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, high: bool) -> None:
        if high != self.level:
            self.changes.append(high)
        self.level = high

    @property
    def rising_edges(self) -> int:
        return sum(1 for c in self.changes if c)


class RecordingInterrupt:
    """An edge ``Interrupt`` that counts triggers."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
