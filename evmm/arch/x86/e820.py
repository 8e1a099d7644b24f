"""The e820 memory map evmm reports, derived from the layout (boot.rst and the ACPI "System Address Map")."""

from __future__ import annotations

from evmm.arch.x86 import layout
from evmm.arch.x86.bootparams import E820Entry, E820Type


def e820_map(mem_size: int) -> tuple[E820Entry, ...]:
    """RAM, with the EBDA/BIOS area (MP table, ACPI tables) and the 32-bit MMIO hole reserved."""
    entries = [E820Entry(0, layout.LOW_RAM_END, E820Type.RAM)]
    # EBDA + legacy VGA/BIOS window: the MP table and ACPI tables live here; the kernel must not use it as RAM.
    entries.append(E820Entry(layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820Type.RESERVED))
    regions = layout.ram_layout(mem_size)
    low_end = regions[0][1]
    entries.append(E820Entry(layout.HIMEM_START, low_end - layout.HIMEM_START, E820Type.RAM))
    entries.append(E820Entry(layout.MMIO32_START, layout.MMIO32_END - layout.MMIO32_START, E820Type.RESERVED))
    for gpa, size in regions[1:]:
        entries.append(E820Entry(gpa, size, E820Type.RAM))
    return tuple(entries)
