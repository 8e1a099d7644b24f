"""A virtio-pci driver for tests: finds the structures through config space and brings a device up the way
Linux's virtio_pci_modern.c does (virtio 1.2 §4.1.4, §4.1.5), with MSI-X or with INTx."""

from __future__ import annotations

import asyncio
import struct

from evmm.address_space import Container
from evmm.devices.pci.config import COMMAND, COMMAND_MEMORY
from evmm.devices.virtio.device import VIRTIO_F_VERSION_1, Activation, VirtioDevice
from evmm.devices.virtio.pci import VirtioPci
from evmm.memory import GuestMemory
from tests.fakes.irq import RecordingIrqLine
from tests.fakes.pci import RecordingMsiSink
from tests.fakes.virtio_driver import RING_BASE, Allocator, DriverQueue, new_memory

BAR_ADDRESS = 0xC000_0000
STATUS_ACK, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
MSI_ADDRESS = 0xFEE0_0000


class PciDriver:
    def __init__(
        self, device: VirtioDevice, *, loop: asyncio.AbstractEventLoop, mem: GuestMemory | None = None
    ):
        self.mem = mem or new_memory()
        self.msi = RecordingMsiSink()
        self.intx = RecordingIrqLine()
        self.fn = VirtioPci(device, self.mem, loop, self.msi)
        self.fn.attach(Container("pci-mem", 1 << 64), Container("pci-io", 1 << 16), self.intx)
        self.fn.program_bar(0, BAR_ADDRESS)
        self.fn.config_write(COMMAND, 2, COMMAND_MEMORY)
        self.caps = self._find_caps()
        self.alloc = Allocator()
        self.queues: list[DriverQueue] = []

    def _find_caps(self) -> dict[int, tuple[int, int, int, int]]:
        """cfg_type -> (capability offset, bar, offset, length), walking the list as vp_modern_probe does."""
        found: dict[int, tuple[int, int, int, int]] = {}
        at = self.fn.config_read(0x34, 1)
        while at:
            if self.fn.config_read(at, 1) == 0x09:
                cfg_type, bar = self.fn.config_read(at + 3, 1), self.fn.config_read(at + 4, 1)
                found.setdefault(
                    cfg_type, (at, bar, self.fn.config_read(at + 8, 4), self.fn.config_read(at + 12, 4))
                )
            at = self.fn.config_read(at + 1, 1)
        return found

    def msix_cap(self) -> int:
        return next(off for off, cap_id in self.fn.config.capabilities() if cap_id == 0x11)

    # --- BAR accesses at a structure's offset ---

    def read(self, cfg_type: int, offset: int, size: int) -> int:
        return self.fn.region.device.read(self.caps[cfg_type][2] + offset, size)

    def write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        self.fn.region.device.write(self.caps[cfg_type][2] + offset, size, value)

    def common_read(self, offset: int, size: int) -> int:
        return self.read(1, offset, size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.write(1, offset, size, value)

    def status(self) -> int:
        return self.common_read(0x14, 1)

    def enable_msix(self) -> None:
        cap = self.msix_cap()
        self.fn.config_write(cap + 2, 2, 0x8000)
        table = self.fn.config_read(cap + 4, 4) & ~7
        for v in range(self.fn.msix.vectors):
            self.fn.region.device.write(table + 16 * v, 4, MSI_ADDRESS)
            self.fn.region.device.write(table + 16 * v + 4, 4, 0)
            self.fn.region.device.write(table + 16 * v + 8, 4, 0x40 + v)
            self.fn.region.device.write(table + 16 * v + 12, 4, 0)

    def bring_up(self, *, msix: bool = True, queue_size: int = 256) -> int:
        self.common_write(0x14, 1, 0)
        self.common_write(0x14, 1, STATUS_ACK)
        self.common_write(0x14, 1, STATUS_ACK | STATUS_DRIVER)
        features = 0
        for sel in (0, 1):
            self.common_write(0x00, 4, sel)
            features |= self.common_read(0x04, 4) << (32 * sel)
        features |= VIRTIO_F_VERSION_1
        for sel in (0, 1):
            self.common_write(0x08, 4, sel)
            self.common_write(0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.common_write(0x14, 1, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.status() & STATUS_FEATURES_OK, "device refused the features"
        if msix:
            self.enable_msix()
            self.common_write(0x10, 2, 0)  # config changes on vector 0, queue i on vector i + 1
            assert self.common_read(0x10, 2) == 0
        base = RING_BASE
        for i in range(self.common_read(0x12, 2)):
            self.common_write(0x16, 2, i)
            size = min(queue_size, self.common_read(0x18, 2))
            q = DriverQueue(self.mem, base, size, self.alloc)
            base = (q.end + 4095) & ~4095
            self.common_write(0x18, 2, size)
            if msix:
                self.common_write(0x1A, 2, i + 1)
                assert self.common_read(0x1A, 2) == i + 1
            for field, addr in ((0x20, q.desc), (0x28, q.avail), (0x30, q.used)):
                self.common_write(field, 4, addr & 0xFFFFFFFF)  # vp_iowrite64_twopart
                self.common_write(field + 4, 4, addr >> 32)
            self.common_write(0x1C, 2, 1)
            self.queues.append(q)
        self.common_write(0x14, 1, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
        return features

    def kick(self, index: int) -> None:
        """A trapped notification: a 16-bit write at the queue's notify address (§4.1.4.4)."""
        self.common_write(0x16, 2, index)
        notify_off = self.common_read(0x1E, 2)
        cap = self.caps[2][0]
        multiplier = struct.unpack_from("<I", self.fn.config.data, cap + 16)[0]
        self.write(2, notify_off * multiplier, 2, index)

    def isr(self) -> int:
        return self.read(3, 0, 1)

    @property
    def ctx(self) -> Activation:
        ctx = self.fn.device.ctx
        assert ctx is not None, "the device is not activated"
        return ctx
