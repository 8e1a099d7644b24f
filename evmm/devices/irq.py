"""How a device raises an interrupt, without knowing KVM.

The machine builder gives each device the kind of line it needs: a level line for legacy ISA devices
(``KVM_IRQ_LINE`` into the in-kernel PIC/IOAPIC), an edge trigger for virtio (an irqfd: one eventfd write, no
ioctl, no exit).  Tests pass recording fakes from ``tests/fakes``.
"""

from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    """A wire whose level the device drives, like the INTR pin of a 16550A."""

    def set_level(self, high: bool) -> None: ...


class Interrupt(Protocol):
    """An edge: each ``trigger`` delivers one interrupt (virtio-mmio ``InterruptStatus`` says why)."""

    def trigger(self) -> None: ...
