"""The driver's queue notifications (virtio 1.2 §2.9), as every transport receives them.

A transport gives each queue an eventfd that KVM signals when the guest writes the queue's notification
address (KVM_IOEVENTFD: virtio-mmio's QueueNotify with the queue index as datamatch, virtio-pci's notify
capability), so a kick never exits to userspace.  ``Kicks`` reads them on the reactor and calls the device's
``queue_notify``; a device may hand a queue's eventfd to a backend outside evmm (vhost) instead, until reset.
Without ioeventfds (unit tests) the transport traps the notification register and calls ``notified``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

from evmm.devices.virtio.queue import QueueBroken


class Kicks:
    def __init__(
        self,
        reactor: asyncio.AbstractEventLoop,
        count: int,
        on_kick: Callable[[int], None],
        eventfds: Sequence[int] = (),
    ) -> None:
        """``eventfds``: one per queue, KVM's ioeventfds, or none when every notification is trapped."""
        self._reactor = reactor
        self._count = count
        self._on_kick = on_kick
        self._fds = list(eventfds)
        self._handed: dict[int, int] = {}  # queue -> the eventfd its backend now reads
        for index, fd in enumerate(self._fds):
            reactor.add_reader(fd, self._on_fd, index, fd)

    def _on_fd(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self._on_kick(index)

    def notified(self, index: int) -> bool:
        """A notification that reached the transport itself (a trapped write, or the look at every queue after
        activation): passed on if the queue is a backend's, and True then; False when it is the device's."""
        fd = self._handed.get(index)
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        return True

    def take(self, index: int) -> int:
        """Hand queue ``index``'s notifications to a backend until ``take_back`` (``QueueKicks.take``).

        With KVM it is the queue's ioeventfd itself, which the reactor stops reading: a kick then goes from the
        guest's write to the backend with no exit and no reactor wake.  Without one it is a fresh eventfd that
        ``notified`` writes.
        """
        if not 0 <= index < self._count:
            raise QueueBroken(f"queue {index} does not exist")
        fd = self._handed.get(index)
        if fd is not None:
            return fd
        if self._fds:
            fd = self._fds[index]
            self._reactor.remove_reader(fd)
        else:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._handed[index] = fd
        return fd

    def take_back(self) -> None:
        """The device was reset: its backend has let go of the eventfds (§2.4: the queues are gone)."""
        for index, fd in self._handed.items():
            if self._fds:
                self._reactor.add_reader(fd, self._on_fd, index, fd)
            else:
                os.close(fd)
        self._handed.clear()

    def close(self) -> list[int]:
        """Stop reading; the ioeventfds are returned for the transport to unregister and close."""
        self.take_back()
        for fd in self._fds:
            self._reactor.remove_reader(fd)
        fds, self._fds = self._fds, []
        return fds
