"""evmm's KVM layer: the fd hierarchy (system -> VM -> vCPU) with typed values in and out.

Raw cdata never leaves this package: callers see ``Regs``/``Sregs``/``CpuidEntry`` and the exit objects.

Importing the package loads no compiled code: the value types (``types``, ``exits``) are plain Python, and
``Kvm``, ``Vm``, ``Vcpu`` and the capability tables load the cffi bindings on first use, so code that only
handles register values or exits runs where the bindings were never built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evmm.kvm import exits
from evmm.kvm.types import CpuidEntry, DTable, Fpu, Regs, Segment, Sregs
from evmm.lazy import lazy_names

if TYPE_CHECKING:
    from evmm.kvm.system import OPTIONAL_CAPS, REQUIRED_CAPS, Kvm
    from evmm.kvm.vcpu import Vcpu
    from evmm.kvm.vm import Vm

# What needs the compiled bindings, and the module that defines it.
_COMPILED = {
    "OPTIONAL_CAPS": "evmm.kvm.system",
    "REQUIRED_CAPS": "evmm.kvm.system",
    "Kvm": "evmm.kvm.system",
    "Vcpu": "evmm.kvm.vcpu",
    "Vm": "evmm.kvm.vm",
}


__getattr__ = lazy_names(__name__, _COMPILED)


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
