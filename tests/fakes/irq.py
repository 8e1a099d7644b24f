"""Recording interrupt fakes: what a device signalled, in order, without KVM or a transport."""

from __future__ import annotations

import os


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


class RecordingVirtioInterrupt:
    """A virtio device's ``VirtioInterrupt`` with no transport behind it: every trigger's source in order
    (a queue index, or CONFIG_CHANGE), every needs-reset reason, and the notifier eventfds handed out."""

    def __init__(self) -> None:
        self.triggers: list[int] = []
        self.resets: list[str] = []
        self.notifiers: dict[int, int] = {}

    def trigger(self, source: int) -> None:
        self.triggers.append(source)

    def notifier(self, queue: int) -> int:
        if queue not in self.notifiers:
            self.notifiers[queue] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self.notifiers[queue]

    def needs_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def close(self) -> None:
        for fd in self.notifiers.values():
            os.close(fd)
        self.notifiers.clear()


class EventfdInterrupt(RecordingInterrupt):
    """An ``Interrupt`` that is an eventfd, as KVM's irqfd is: a trigger writes it, and so may a backend."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def trigger(self) -> None:
        super().trigger()
        os.eventfd_write(self.fd, 1)

    def pending(self) -> int:
        """Interrupts since the last look (the backend's writes and the triggers alike)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)
