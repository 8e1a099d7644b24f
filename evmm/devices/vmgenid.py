"""The VM generation ID (Microsoft's "Virtual Machine Generation ID" specification, as QEMU's vmgenid and
Firecracker's VMGenID implement it): 16 bytes in guest RAM that change whenever the VM may have been copied.

The DSDT's VGEN device (evmm/acpi/dsdt.py) tells the guest where the ID is; a new one is written on every
restore of a snapshot, and the guest is notified through the GED (ACPI 6.5 §5.6.9).  Linux >= 5.18 then
mixes the ID into its RNG and reseeds at once ("crng reseeded due to virtual machine fork",
add_vmfork_randomness), so clones of one snapshot stop drawing the same random numbers.  The page is
reserved in the e820 map, so the guest never uses it as RAM; the ID is part of the memory a snapshot saves.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from evmm.memory import GuestMemory

GENERATION_ID_SIZE = 16


class VmGenId:
    def __init__(self, memory: GuestMemory, addr: int, notify: Callable[[], None]) -> None:
        self._memory = memory
        self.addr = addr
        self._notify = notify

    @property
    def generation(self) -> bytes:
        return self._memory.read(self.addr, GENERATION_ID_SIZE)

    def write(self, generation: bytes) -> None:
        """Store an ID without telling the guest (at boot, before it looks)."""
        if len(generation) != GENERATION_ID_SIZE:
            raise ValueError(f"a VM generation ID is {GENERATION_ID_SIZE} bytes")
        self._memory.write(self.addr, generation)

    def new_generation(self, generation: bytes | None = None) -> bytes:
        """A new (random unless given) ID, then the notification; returns the ID."""
        new = generation if generation is not None else os.urandom(GENERATION_ID_SIZE)
        self.write(new)
        self._notify()
        return new

    def describe(self) -> dict[str, object]:
        return {"vmgenid": self.generation.hex()}
