"""evmm.kvm loads its compiled bindings only when something needs KVM itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter where the compiled module cannot be imported, as on a machine where it was
# never built.
PROGRAM = textwrap.dedent(
    """
    import sys
    sys.modules["evmm.kvm._kvm_ffi"] = None  # `import` of it now raises ImportError

    import evmm.kvm
    from evmm.kvm import CpuidEntry, Regs, exits
    from evmm.loop import vcpu_thread  # the dispatcher's types need no bindings either
    from evmm.arch.x86 import boot

    assert exits.IoOut(0x3F8, 1, 1, b"a").port == 0x3F8
    assert Regs(rip=0x1000).rip == 0x1000 and CpuidEntry(0, 0, 0, 1, 2, 3, 4).ebx == 2
    assert "evmm.kvm.system" not in sys.modules and "evmm.kvm.vcpu" not in sys.modules
    try:
        evmm.kvm.Kvm
    except Exception as e:
        print(type(e).__name__, e)
    """
)


def test_value_types_and_exits_import_without_the_compiled_bindings() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    # Asking for KVM itself then says, in one line, what is missing.
    assert out.stdout.startswith("KvmError evmm's KVM bindings are not compiled"), out.stdout
    assert out.stdout.count("\n") == 1


def test_the_lazy_names_are_the_real_classes() -> None:
    import evmm.kvm
    from evmm.kvm.system import Kvm
    from evmm.kvm.vcpu import Vcpu
    from evmm.kvm.vm import Vm

    assert (evmm.kvm.Kvm, evmm.kvm.Vcpu, evmm.kvm.Vm) == (Kvm, Vcpu, Vm)
