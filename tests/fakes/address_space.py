"""Fakes for the address-space listeners: a listener that records every call, and a VM that records the
memory slots and ioeventfds a ``KvmListener`` asks for."""

from __future__ import annotations

import mmap

from evmm.address_space.flatview import FlatRange, IoEventFd
from evmm.errors import KvmError


def describe(fr: FlatRange) -> tuple[int, int, str, int]:
    return (fr.start, fr.size, fr.region.name, fr.offset_in_region)


class RecordingListener:
    """Every listener call, in order, as ``(call, start or address, size or length, region name, offset)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, str, int]] = []

    def region_add(self, fr: FlatRange) -> None:
        self.calls.append(("add", *describe(fr)))

    def region_del(self, fr: FlatRange) -> None:
        self.calls.append(("del", *describe(fr)))

    def ioeventfd_add(self, e: IoEventFd) -> None:
        self.calls.append(("fd+", e.addr, e.length, e.region.name, e.fd))

    def ioeventfd_del(self, e: IoEventFd) -> None:
        self.calls.append(("fd-", e.addr, e.length, e.region.name, e.fd))

    def take(self) -> list[tuple[str, int, int, str, int]]:
        calls, self.calls = self.calls, []
        return calls


class FailingListener(RecordingListener):
    """Refuses to add anything, as KVM refuses a slot."""

    def region_add(self, fr: FlatRange) -> None:
        super().region_add(fr)
        raise KvmError(f"no slot for {fr.region.name}")


class SlotRecordingVm:
    """The ``SlotVm`` of a KvmListener: live memory slots by number, and ioeventfd (de)assignments."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int, bool]] = {}  # slot -> (gpa, size, buffer offset, readonly)
        self.ioeventfds: list[tuple[str, int, int, int, int | None, bool]] = []

    def set_user_memory_region(
        self,
        slot: int,
        gpa: int,
        buffer: mmap.mmap,
        *,
        readonly: bool = False,
        offset: int = 0,
        size: int | None = None,
    ) -> None:
        assert slot not in self.slots, f"slot {slot} reused while live"
        self.slots[slot] = (gpa, len(buffer) - offset if size is None else size, offset, readonly)

    def delete_user_memory_region(self, slot: int) -> None:
        del self.slots[slot]

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        self.ioeventfds.append(("del" if deassign else "add", fd, addr, length, datamatch, pio))
