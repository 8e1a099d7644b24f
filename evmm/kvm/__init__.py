"""evmm's KVM layer: the fd hierarchy (system -> VM -> vCPU) with typed values in and out.

Raw cdata never leaves this package: callers see ``Regs``/``Sregs``/``CpuidEntry`` and the exit objects.
"""

from evmm.kvm import exits
from evmm.kvm.system import OPTIONAL_CAPS, REQUIRED_CAPS, Kvm
from evmm.kvm.types import CpuidEntry, DTable, Fpu, Regs, Segment, Sregs
from evmm.kvm.vcpu import Vcpu
from evmm.kvm.vm import Vm

__all__ = [
    "OPTIONAL_CAPS",
    "REQUIRED_CAPS",
    "CpuidEntry",
    "DTable",
    "Fpu",
    "Kvm",
    "Regs",
    "Segment",
    "Sregs",
    "Vcpu",
    "Vm",
    "exits",
]
