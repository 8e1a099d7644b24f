"""The PC's GSI routing, matching what the MADT and MP table tell the guest.

KVM's default table sends GSI 0 to IOAPIC pin 0, but evmm's firmware tables say ISA IRQ 0 arrives on GSI 2
(the MADT interrupt source override every PC has).  So, as QEMU's kvm_pc_setup_irq_routing does: ISA IRQs go to
the 8259 pair and to the IOAPIC pin of the same number, except IRQ 0 -> IOAPIC pin 2 and nothing on GSI 2 (the
8259 cascade); GSIs 16-23 go to the IOAPIC only.
"""

from __future__ import annotations

from evmm.arch.x86.layout import IOAPIC_PINS
from evmm.kvm.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, GsiRoute


def pc_gsi_routes() -> list[GsiRoute]:
    routes = [GsiRoute(i, IRQCHIP_PIC_MASTER, i) for i in range(8) if i != 2]
    routes += [GsiRoute(i, IRQCHIP_PIC_SLAVE, i - 8) for i in range(8, 16)]
    routes.append(GsiRoute(0, IRQCHIP_IOAPIC, 2))
    routes += [GsiRoute(i, IRQCHIP_IOAPIC, i) for i in range(1, IOAPIC_PINS) if i != 2]
    return routes
