"""KVM-backed interrupt lines for devices (which only see the ``IrqLine``/``Interrupt`` protocols)."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evmm.kvm import Vm


class KvmIrqLine:
    """A level line into the in-kernel PIC/IOAPIC via ``KVM_IRQ_LINE``; safe from any thread."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self._level = False
        self._lock = threading.Lock()

    def set_level(self, high: bool) -> None:
        with self._lock:  # keep the order of level changes the order KVM sees them
            if high == self._level:
                return
            self._level = high
            self._vm.irq_line(self.gsi, high)


class IrqfdInterrupt:
    """An edge through an irqfd: ``trigger`` is one eventfd write, and KVM injects the GSI itself."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.gsi = gsi
        self._vm = vm
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.irqfd(self.fd, gsi)

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            self._vm.irqfd(self.fd, self.gsi, deassign=True)
            os.close(self.fd)
            self.fd = -1


class KvmNotifyRegistrar:
    """ioeventfds for virtio queue kicks: KVM signals the eventfd itself, the vCPU never exits to us."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm

    def add(self, addr: int, datamatch: int) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._vm.ioeventfd(fd, addr, 4, datamatch=datamatch)
        return fd

    def remove(self, addr: int, datamatch: int, fd: int) -> None:
        self._vm.ioeventfd(fd, addr, 4, datamatch=datamatch, deassign=True)
        os.close(fd)
