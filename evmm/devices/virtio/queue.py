"""The split virtqueue (virtio 1.2 §2.7), shared by every evmm virtio device.

The queue never owns guest memory: each call takes the ``GuestMemory`` it works on (as rust-vmm's
virtio-queue does).  Every index, address and length the driver supplies is checked before use; a malformed
chain is returned as ``InvalidChain`` (the device completes it with no data, failing that one request), and a
queue whose rings cannot be trusted at all raises ``QueueBroken`` (the transport sets DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import struct
import sys

from evmm.devices.virtio.chain import Descriptor, DescriptorChain, InvalidChain, walk_chain
from evmm.errors import GuestMemoryError
from evmm.memory import GuestMemory
from evmm.record import record

# Ring layout (§2.7.6 avail ring, §2.7.8 used ring).
_USED_ELEM = struct.Struct("<II")
# The 16-bit ring fields are read and written as native 'H' items of a cast memoryview: the rings are
# little-endian (virtio 1.2 §2.7), and so is every host evmm runs on (x86).
assert sys.byteorder == "little"
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768


class QueueBroken(Exception):
    """The driver broke the queue (e.g. an avail index more than a ring ahead): the device needs a reset."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10: notify if ``event_idx`` lies in the window (old_idx, new_idx], in 16-bit arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@record
class QueueConfig:
    """What the driver programs through the transport before setting QueueReady."""

    size: int = 0
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    ready: bool = False


def check_queue_config(cfg: QueueConfig, max_size: int, mem: GuestMemory) -> str | None:
    """Why the driver's queue configuration is unusable, or None (§2.7 alignment, §2.7.1 sizes)."""
    if cfg.size == 0 or cfg.size > max_size or cfg.size & (cfg.size - 1):
        return f"queue size {cfg.size} is not a power of two up to {max_size}"
    if cfg.desc_addr % 16 or cfg.avail_addr % 2 or cfg.used_addr % 4:
        return "queue areas are misaligned"
    areas = (
        (cfg.desc_addr, 16 * cfg.size),
        (cfg.avail_addr, 6 + 2 * cfg.size),
        (cfg.used_addr, 6 + 8 * cfg.size),
    )
    for addr, length in areas:
        if not mem.contains(addr, length):
            return f"queue area {addr:#x}+{length:#x} is outside guest RAM"
    return None


class Virtqueue:
    """Device side of one split virtqueue, created when the driver sets the device DRIVER_OK."""

    def __init__(self, index: int, cfg: QueueConfig, mem: GuestMemory, *, event_idx: bool) -> None:
        self.index = index
        self.size = cfg.size
        self.event_idx = event_idx
        self.desc_addr = cfg.desc_addr
        self.avail_addr = cfg.avail_addr
        self.used_addr = cfg.used_addr
        # Views stay valid as long as guest memory is mapped; the areas were checked by check_queue_config.
        self._desc = mem.view(cfg.desc_addr, 16 * cfg.size)
        self._avail = mem.view(cfg.avail_addr, 6 + 2 * cfg.size)
        self._used = mem.view(cfg.used_addr, 6 + 8 * cfg.size)
        # The driver reads and writes the rings' 16-bit fields while we do (its vCPUs run on), so each must
        # be one 16-bit load or store, as the driver's own are (Linux: READ_ONCE/WRITE_ONCE).  An 'H' item of
        # a cast memoryview is one aligned 16-bit move each way (CPython's memoryobject.c, a sizeof-2 memcpy;
        # the areas' alignment was checked, §2.7: avail 2, used 4).  struct.pack_into is not: it zeroes the
        # destination before writing the value (CPython's s_pack_internal), and a driver polling used->idx
        # that saw 0 for a moment would take it for a ring's worth of completions and read used elements not
        # yet written.
        self._avail16 = self._avail.cast("H")  # [0] flags, [1] idx, [2 + slot] ring, [2 + size] used_event
        self._used16 = self._used.cast("H")  # [0] flags, [1] idx, [2 + 4 * size] avail_event
        self._used_event = 2 + cfg.size
        self._avail_event = 2 + 4 * cfg.size
        self.next_avail = 0
        self.next_used = 0
        self._notify = True  # the device wants kicks (set_notification)
        self._signalled_used: int | None = None  # used idx at the last interrupt, for EVENT_IDX suppression
        # Heads the device holds (popped, not yet used).  A driver that offers one of them again has broken the
        # ring (§2.7.13: a buffer is the device's until it is used), and the device must not act on it twice:
        # two completions of one head free the driver's buffer twice ("id N is not a head!" in Linux).
        self._in_flight: set[int] = set()
        self._last_head = -1

    def release(self) -> None:
        """Drop the ring views (the device is reset or the VM is going away)."""
        for view in (self._avail16, self._used16, self._desc, self._avail, self._used):
            view.release()

    # ---- driver -> device ----------------------------------------------------------------------------

    def avail_idx(self) -> int:
        return self._avail16[1]

    def has_available(self) -> bool:
        return self.avail_idx() != self.next_avail

    def pop(self, mem: GuestMemory) -> DescriptorChain | InvalidChain | None:
        """The next available chain, ``InvalidChain`` for a malformed one, or None when the ring is empty."""
        avail = self.avail_idx()
        if avail == self.next_avail:
            if not (self.event_idx and self._notify):
                return None
            # Empty: ask for a kick when the driver adds the next buffer (avail_event = next_avail), then look
            # once more, for buffers added before the driver could see the new avail_event (§2.7.10).
            self._used16[self._avail_event] = self.next_avail
            mem.fence()
            avail = self.avail_idx()
            if avail == self.next_avail:
                return None
        if (avail - self.next_avail) & 0xFFFF > self.size:
            raise QueueBroken(
                f"queue {self.index}: avail index {avail} is more than a ring ahead of {self.next_avail}"
            )
        slot = self.next_avail % self.size
        head = self._avail16[2 + slot]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        if head >= self.size:
            # No valid head to complete: count it as consumed and report it with head 0 length 0 is wrong
            # (that would complete someone else's chain), so the queue is unusable.
            raise QueueBroken(f"queue {self.index}: descriptor head {head} is outside a ring of {self.size}")
        if head in self._in_flight:
            raise QueueBroken(
                f"queue {self.index}: the driver offered descriptor head {head} again before it was used"
            )
        self._in_flight.add(head)
        self._last_head = head
        return walk_chain(mem, self._desc, self.size, head)

    def undo_pop(self) -> None:
        """Put the last popped chain back (a device that found no room for it will retry later)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF
        self._in_flight.discard(self._last_head)
        self._last_head = -1

    # ---- device -> driver ----------------------------------------------------------------------------

    def add_used(self, head: int, length: int) -> None:
        """Publish one completed chain: the element first, then the index (§2.7.8.2).

        x86 stores are not reordered with other stores (Intel SDM vol. 3A §9.2.2), and these are plain stores
        into the guest's RAM mapping, so the driver never sees the new index before the element.
        """
        self.fill_used(head, length)
        self.publish_used()

    def fill_used(self, head: int, length: int) -> None:
        """Write a used element without moving the index the driver reads: ``publish_used`` makes it (and
        every element filled before it) visible at once.  For completions the driver must see together,
        such as the buffers of one merged virtio-net packet: Linux reads num_buffers from the first and
        takes the rest at once, counting any it cannot find yet as an error (virtio 1.2 §5.1.6.4)."""
        if head not in self._in_flight:
            # A device bug, never the driver's doing: completing a head twice corrupts the driver's state.
            raise QueueBroken(f"queue {self.index}: the device completed head {head}, which it does not hold")
        self._in_flight.discard(head)
        slot = self.next_used % self.size
        # pack_into zeroes the element before writing it; harmless here: the driver reads no element at or
        # beyond used->idx, and this one is only published by the index store after it.
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF

    def publish_used(self) -> None:
        """Store the used index: the driver now sees every element filled so far."""
        self._used16[1] = self.next_used

    @staticmethod
    def _fence() -> None:
        GuestMemory.fence()

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was used since the last one (§2.7.10)."""
        # The used index we just stored must be visible before we read the driver's used_event/flags.
        self._fence()
        if self.event_idx:
            used_event = self._avail16[self._used_event]
            old = self._signalled_used
            self._signalled_used = self.next_used
            if old is None:
                return True
            return vring_need_event(used_event, self.next_used, old)
        flags = self._avail16[0]
        return not flags & VRING_AVAIL_F_NO_INTERRUPT

    def status(self) -> dict[str, int | bool]:
        """Both sides' indices as they stand (query-vm): what to read when a queue stalls.

        next_avail/avail_idx: chains the device has taken / the driver has offered; next_used/used_idx: the
        device's completions filled / published; with EVENT_IDX, avail_event and used_event are each side's
        request to be notified (§2.7.10), signalled_used the used index at the last interrupt sent.
        """
        out: dict[str, int | bool] = {
            "size": self.size,
            "next_avail": self.next_avail,
            "avail_idx": self.avail_idx(),
            "next_used": self.next_used,
            "used_idx": self._used16[1],
            "notify": self._notify,
        }
        if self.event_idx:
            out["used_event"] = self._avail16[self._used_event]
            out["avail_event"] = self._used16[self._avail_event]
            out["signalled_used"] = -1 if self._signalled_used is None else self._signalled_used
        else:
            out["avail_flags"] = self._avail16[0]
            out["used_flags"] = self._used16[0]
        return out

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) when it adds buffers (§2.7.7, §2.7.10).

        With EVENT_IDX the device publishes avail_event = the next index it will look at; without it, the
        NO_NOTIFY flag.  After enabling, the caller must re-check ``has_available`` to close the race with a
        driver that added buffers before it saw the change.
        """
        self._notify = enabled
        if self.event_idx:
            # Disabling is a no-op: an avail_event left behind next_avail already stops further kicks.
            if enabled:
                self._used16[self._avail_event] = self.next_avail
        else:
            self._used16[0] = 0 if enabled else VRING_USED_F_NO_NOTIFY
        self._fence()


__all__ = [
    "Descriptor",
    "DescriptorChain",
    "GuestMemoryError",
    "InvalidChain",
    "QueueBroken",
    "QueueConfig",
    "Virtqueue",
    "check_queue_config",
    "vring_need_event",
]
