"""The virtio-pci transport, modern only (virtio 1.2 §4.1): a PCI function in front of a ``VirtioDevice``.

One 64-bit memory BAR holds every structure, each found through a vendor capability (§4.1.4): the common
configuration (§4.1.4.3), the ISR status (§4.1.4.5), the device configuration (§4.1.4.6), the notification
area (§4.1.4.4: queue ``i`` at ``i * NOTIFY_MULTIPLIER``), and the MSI-X table and PBA.  A PCI configuration
access capability (§4.1.4.9) reaches the BAR through config space.

Queue notifications are ioeventfds on the BAR's region, so they follow the BAR wherever the guest puts it and
never exit to userspace; a trapped one (no KVM: unit tests) reaches the same kick.  Interrupts: with MSI-X
enabled, the vector the driver gave the queue (or the config vector), through the MSI sink; otherwise INTx
with the ISR saying why, cleared when the driver reads it (§4.1.4.5.1).  The device never knows which.
Register accesses and kicks arrive on the reactor, which owns all of it.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable

from evmm.address_space.region import Io, Region
from evmm.devices.pci.bar import Bar, BarKind
from evmm.devices.pci.function import PciFunction, PciIds
from evmm.devices.pci.msix import MsiSink, Msix, pba_bytes, table_bytes
from evmm.devices.virtio.device import (
    CONFIG_CHANGE,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE,
    VIRTIO_ID_NET,
    VIRTIO_ID_VSOCK,
    VirtioDevice,
)
from evmm.devices.virtio.transport import TransportCore
from evmm.memory import GuestMemory

VIRTIO_VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040  # device ID = 0x1040 + the virtio device ID (§4.1.2.1)
REVISION = 1  # a modern-only (non-transitional) device has revision 1 or more (§4.1.2.1)
SUBSYSTEM = 0x40  # and a subsystem ID of 0x40 or more
# PCI class codes, as other VMMs give these devices (Linux's virtio_pci binds by vendor and device ID alone).
CLASSES = {
    VIRTIO_ID_NET: 0x020000,  # network, Ethernet
    VIRTIO_ID_BLOCK: 0x010000,  # mass storage, SCSI
    VIRTIO_ID_CONSOLE: 0x078000,  # communication, other
    VIRTIO_ID_VSOCK: 0x078000,
}
OTHER_CLASS = 0xFF0000

# virtio_pci_cap cfg_type values (§4.1.4).
CAP_COMMON_CFG = 1
CAP_NOTIFY_CFG = 2
CAP_ISR_CFG = 3
CAP_DEVICE_CFG = 4
CAP_PCI_CFG = 5
CAP_VENDOR = 0x09  # PCI capability ID: vendor specific

# The BAR's layout: a page per structure.
BAR_INDEX = 0
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET = 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_MULTIPLIER = 0x3000, 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x6000
BAR_SIZE = 0x8000

# Common configuration fields (§4.1.4.3): offset -> width.
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
NO_VECTOR = 0xFFFF  # VIRTIO_MSI_NO_VECTOR (§4.1.4.3)

ISR_QUEUE = 1
ISR_CONFIG = 2


def _cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A virtio_pci_cap after its ID and next bytes: cap_len, cfg_type, bar, id, padding, offset, length."""
    return struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, BAR_INDEX, 0, offset, length) + extra


class VirtioPci(PciFunction):
    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        reactor: asyncio.AbstractEventLoop,
        msi: MsiSink,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        ids = PciIds(
            vendor=VIRTIO_VENDOR,
            device=MODERN_DEVICE_BASE + device.device_id,
            class_code=CLASSES.get(device.device_id, OTHER_CLASS),
            revision=REVISION,
            subsystem_vendor=VIRTIO_VENDOR,
            subsystem=SUBSYSTEM,
        )
        super().__init__(device.name, ids, (Bar(BAR_INDEX, BAR_SIZE, BarKind.MEM64),), intx_pin=1)
        count = len(device.queue_sizes)
        if NOTIFY_OFFSET + NOTIFY_MULTIPLIER * count > MSIX_TABLE_OFFSET or count + 1 > 256:
            raise ValueError(f"{device.name}: {count} queues do not fit the virtio-pci BAR")
        self.msix = Msix(count + 1, msi)  # one vector per queue and one for config changes
        self._add_capabilities(count)
        self._isr = 0
        self._eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count)]
        self.region = Io(f"{device.name}-bar{BAR_INDEX}", BAR_SIZE, _BarRegisters(self))
        for i, fd in enumerate(self._eventfds):
            self.region.add_ioeventfd(NOTIFY_OFFSET + NOTIFY_MULTIPLIER * i, 2, fd)
        # No ``direct_call``: a backend's (vhost's) interrupts come through the reactor (TransportCore.call_fd),
        # because a vector's irqfd handed to the kernel would bypass the vector's mask and pending bit
        # (PCI 3.0 §6.8.2.9) and its lazy re-routing, all of which live here (Msix).
        self.core = TransportCore(
            device, mem, reactor, self._signal, f"{device.name} (virtio-pci)", self._eventfds, on_error
        )
        self._reset_transport()

    def _add_capabilities(self, queues: int) -> None:
        cfg = self.config
        cfg.add_capability(CAP_VENDOR, _cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE))
        cfg.add_capability(CAP_VENDOR, _cap(CAP_ISR_CFG, ISR_OFFSET, 1))
        cfg.add_capability(CAP_VENDOR, _cap(CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE))
        notify_len = NOTIFY_MULTIPLIER * queues
        cfg.add_capability(
            CAP_VENDOR, _cap(CAP_NOTIFY_CFG, NOTIFY_OFFSET, notify_len, struct.pack("<I", NOTIFY_MULTIPLIER))
        )
        # §4.1.4.9: the driver writes bar, offset and length, then accesses pci_cfg_data.
        writable = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + b"\xff" * 4
        self._pci_cfg = cfg.add_capability(CAP_VENDOR, _cap(CAP_PCI_CFG, 0, 0, bytes(4)), writable)
        self.msix.add_capability(cfg, BAR_INDEX, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET)
        self._msix_control = cfg.capabilities()[-1][0] + 2

    @property
    def device(self) -> VirtioDevice:
        return self.core.device

    def _reset_transport(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * self.core.queue_count
        for q, size in zip(self.core.queues, self.device.queue_sizes, strict=True):
            q.size = size  # queue_size reads the maximum until the driver writes its own (§4.1.4.3)
        self._set_isr(0)

    # ---- PciFunction -----------------------------------------------------------------------------------

    def bar_region(self, index: int) -> Region:
        return self.region

    def config_read(self, offset: int, size: int) -> int:
        data = self._pci_cfg + 16
        if data <= offset < data + 4:
            bar, start, length = self._pci_cfg_window()
            if bar == BAR_INDEX and length in (1, 2, 4) and start + length <= BAR_SIZE:
                value = self._bar_read(start, length).to_bytes(4, "little")
                self.config.data[data : data + 4] = value
        return super().config_read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        if offset < self._msix_control + 2 and self._msix_control < offset + size:
            self.msix.control_written()
            self._set_isr(self._isr)  # INTx is only for a function without MSI-X enabled
        data = self._pci_cfg + 16
        if offset < data + 4 and data < offset + size:
            bar, start, length = self._pci_cfg_window()
            if bar == BAR_INDEX and length in (1, 2, 4) and start + length <= BAR_SIZE:
                value = self.config.get(data, 4) & ((1 << (8 * length)) - 1)
                self._bar_write(start, length, value)

    def _pci_cfg_window(self) -> tuple[int, int, int]:
        cap = self._pci_cfg
        return self.config.data[cap + 4], self.config.get(cap + 8, 4), self.config.get(cap + 12, 4)

    # ---- the device's interrupt (TransportCore's signal) -------------------------------------------------

    def _signal(self, source: int) -> None:
        if source == CONFIG_CHANGE:
            self._set_isr(self._isr | ISR_CONFIG)  # set even with MSI-X (§4.1.4.5.1)
        if self.msix.enabled:
            vector = self.config_vector if source == CONFIG_CHANGE else self.queue_vectors[source]
            if vector != NO_VECTOR:
                self.msix.trigger(vector)
            return
        self._set_isr(self._isr | (ISR_CONFIG if source == CONFIG_CHANGE else ISR_QUEUE))

    def _set_isr(self, value: int) -> None:
        self._isr = value
        self.set_intx(bool(value) and not self.msix.enabled)

    # ---- the BAR -------------------------------------------------------------------------------------------

    def _bar_read(self, offset: int, size: int) -> int:
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            return self._common_read(offset - COMMON_OFFSET, size)
        if offset == ISR_OFFSET:
            value = self._isr
            self._set_isr(0)  # reading acknowledges (§4.1.4.5.1)
            return value
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            return self.core.read_config(offset - DEVICE_OFFSET, size)
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + table_bytes(self.msix.vectors):
            return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + pba_bytes(self.msix.vectors):
            return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
        return 0

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
            self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
            self.device.write_config(offset - DEVICE_OFFSET, value.to_bytes(size, "little"))
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * self.core.queue_count:
            if (offset - NOTIFY_OFFSET) % NOTIFY_MULTIPLIER == 0:
                self.core.kick((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)  # trapped, not an ioeventfd
        elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + table_bytes(self.msix.vectors):
            self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    # ---- common configuration (§4.1.4.3) -------------------------------------------------------------------

    def _selected(self) -> int | None:
        return self.queue_select if self.queue_select < self.core.queue_count else None

    def _common_read(self, offset: int, size: int) -> int:
        core, q = self.core, self._selected()
        fields: dict[tuple[int, int], Callable[[], int]] = {
            (DEVICE_FEATURE_SELECT, 4): lambda: self.device_feature_select,
            (DEVICE_FEATURE, 4): lambda: core.device_features(self.device_feature_select),
            (DRIVER_FEATURE_SELECT, 4): lambda: self.driver_feature_select,
            (DRIVER_FEATURE, 4): lambda: (
                (core.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
                if self.driver_feature_select < 2
                else 0
            ),
            (CONFIG_MSIX_VECTOR, 2): lambda: self.config_vector,
            (NUM_QUEUES, 2): lambda: core.queue_count,
            (DEVICE_STATUS, 1): lambda: core.status,
            (CONFIG_GENERATION, 1): lambda: core.config_generation & 0xFF,
            (QUEUE_SELECT, 2): lambda: self.queue_select,
        }
        if q is not None:
            cfg = core.queues[q]
            fields |= {
                (QUEUE_SIZE, 2): lambda: cfg.size,
                (QUEUE_MSIX_VECTOR, 2): lambda: self.queue_vectors[q],
                (QUEUE_ENABLE, 2): lambda: int(cfg.ready),
                (QUEUE_NOTIFY_OFF, 2): lambda: q,
                (QUEUE_DESC, 8): lambda: cfg.desc_addr,
                (QUEUE_DRIVER, 8): lambda: cfg.avail_addr,
                (QUEUE_DEVICE, 8): lambda: cfg.used_addr,
            }
        read = fields.get((offset, size))
        if read is not None:
            return read()
        if size == 4 and (offset - 4, 8) in fields:  # the high half of a 64-bit address
            return fields[(offset - 4, 8)]() >> 32
        if size == 4 and (offset, 8) in fields:
            return fields[(offset, 8)]() & 0xFFFFFFFF
        return 0

    def _common_write(self, offset: int, size: int, value: int) -> None:
        core = self.core
        if (offset, size) == (DEVICE_FEATURE_SELECT, 4):
            self.device_feature_select = value
        elif (offset, size) == (DRIVER_FEATURE_SELECT, 4):
            self.driver_feature_select = value
        elif (offset, size) == (DRIVER_FEATURE, 4):
            core.write_driver_features(self.driver_feature_select, value)
        elif (offset, size) == (CONFIG_MSIX_VECTOR, 2):
            self.config_vector = self._vector(value)
        elif (offset, size) == (DEVICE_STATUS, 1):
            core.write_status(value)
            if value == 0:
                self._reset_transport()
        elif (offset, size) == (QUEUE_SELECT, 2):
            self.queue_select = value
        else:
            self._queue_write(offset, size, value)

    def _queue_write(self, offset: int, size: int, value: int) -> None:
        q = self._selected()
        if q is None:
            return
        if (offset, size) == (QUEUE_MSIX_VECTOR, 2):
            self.queue_vectors[q] = self._vector(value)
            return
        cfg = self.core.queue_config(q)  # None once DRIVER_OK: the queue is the device's
        if cfg is None:
            return
        if (offset, size) == (QUEUE_SIZE, 2):
            cfg.size = value
        elif (offset, size) == (QUEUE_ENABLE, 2):
            cfg.ready = cfg.ready or value == 1  # a driver never disables a queue (§4.1.4.3.2)
        for field, name in (
            (QUEUE_DESC, "desc_addr"),
            (QUEUE_DRIVER, "avail_addr"),
            (QUEUE_DEVICE, "used_addr"),
        ):
            old = getattr(cfg, name)
            if (offset, size) == (field, 8):
                setattr(cfg, name, value)
            elif (offset, size) == (field, 4):
                setattr(cfg, name, (old & ~0xFFFFFFFF) | value)
            elif (offset, size) == (field + 4, 4):
                setattr(cfg, name, (old & 0xFFFFFFFF) | (value << 32))

    def _vector(self, value: int) -> int:
        """A vector the device can use, or NO_VECTOR, which the driver reads back as the refusal (§4.1.5.1.2)."""
        return value if value < self.msix.vectors else NO_VECTOR

    # ---- teardown and state ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Unplugged or the VM is going away: the device closed, its notification eventfds released."""
        for fd in self.core.close():
            if self.region.ioeventfds and any(e.fd == fd for e in self.region.ioeventfds):
                self.region.remove_ioeventfd(fd)
            os.close(fd)
        self._eventfds = []

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "msix": self.msix.describe(), "virtio": self.core.describe()}


class _BarRegisters:
    """The BAR's ``BusDevice``: every access on the reactor."""

    def __init__(self, function: VirtioPci) -> None:
        self._function = function

    def read(self, offset: int, size: int) -> int:
        return self._function._bar_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._function._bar_write(offset, size, value)
