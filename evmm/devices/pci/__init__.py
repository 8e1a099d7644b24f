"""PCI for the standard board: config space, BARs, MSI-X, bus 0 with ECAM and 0xCF8/0xCFC, INTx routing and
ACPI hotplug registers.  Pure models: nothing here knows KVM; the board wires them to the region tree, the
GSI routing table and the GED.

    config.py       config space bytes, write masks, capability list
    bar.py          BAR layout, sizing and where a BAR decodes
    function.py     a type-0 function: BARs moved through the region tree, INTx
    msix.py         MSI-X table, PBA, masking and pending bits
    root.py         bus 0, ECAM, configuration mechanism #1
    host_bridge.py  00:00.0
    intx.py         the INTx swizzle and shared lines
    hotplug.py      the ACPI hotplug registers the DSDT's slot methods use
"""
