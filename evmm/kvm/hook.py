"""Exit hooks: C code that answers some guest accesses around ``KVM_RUN``, never returning to Python for them.

``Vcpu.run`` normally returns every port-I/O and MMIO exit to Python.  With hooks attached it runs
``evmm_run_hooked`` (evmm/kvm/_build.py) instead, which re-enters the guest at once whenever a hook's C
function answers the access.  A hook claims one range, as a device on a bus does, and its function sees each
access as the buses show one to a device:

    int fn(void *context, int is_write, uint64_t offset, uint32_t size, uint8_t *data);

``offset`` is into the hook's range; ``data`` holds a write's bytes or receives a read's answer; the result
is 1 when the hook answered, 0 to leave the access to Python.  It runs on the vCPU thread without the GIL, in
the middle of a guest instruction: it must lock what it shares and never block.  The hook's owner (a device,
which knows nothing of KVM) gives the function and its context as addresses, so no cdata crosses between
cffi modules, and keeps both alive while a vCPU holds the hook.
"""

from __future__ import annotations

from typing import Protocol


class ExitHook(Protocol):
    @property
    def pio(self) -> bool:
        """Port I/O space (else MMIO)."""

    @property
    def base(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def c_function(self) -> int:
        """The address of the C function above."""

    @property
    def c_context(self) -> int:
        """Its first argument."""
