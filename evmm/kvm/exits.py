"""VM exits as small typed objects, decoded from ``struct kvm_run`` at the boundary (vcpu.py)."""

from __future__ import annotations

from evmm.record import record


@record(frozen=True, slots=True)
class IoIn:
    """``in`` / ``ins``: the vCPU wants ``count`` values of ``size`` bytes from ``port``."""

    port: int
    size: int
    count: int


@record(frozen=True, slots=True)
class IoOut:
    """``out`` / ``outs``: ``data`` holds ``count`` values of ``size`` bytes for ``port``."""

    port: int
    size: int
    count: int
    data: bytes


@record(frozen=True, slots=True)
class MmioRead:
    addr: int
    size: int


@record(frozen=True, slots=True)
class MmioWrite:
    addr: int
    size: int
    data: bytes


@record(frozen=True, slots=True)
class Hlt:
    """HLT with no in-kernel irqchip (evmm always has one, so only tiny test guests see this)."""


@record(frozen=True, slots=True)
class Shutdown:
    """The vCPU shut down: on x86 a triple fault."""


@record(frozen=True, slots=True)
class SystemEvent:
    """A PSCI-style event (``KVM_SYSTEM_EVENT_SHUTDOWN``/``RESET``/``CRASH``)."""

    type: int


@record(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    def describe(self) -> str:
        kinds = {
            1: "emulation failure",
            2: "simultaneous exceptions",
            3: "delivery event",
            4: "unexpected exit",
        }
        words = " ".join(f"{d:#x}" for d in self.data)
        return f"KVM internal error: {kinds.get(self.suberror, f'suberror {self.suberror}')} [{words}]"


@record(frozen=True, slots=True)
class FailEntry:
    reason: int
    cpu: int

    def describe(self) -> str:
        return (
            f"KVM could not enter the guest: hardware entry failure reason {self.reason:#x} on cpu {self.cpu}"
        )


@record(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal or ``immediate_exit`` asked the vCPU thread to look at its state."""


@record(frozen=True, slots=True)
class Unhandled:
    reason: int


VmExit = (
    IoIn
    | IoOut
    | MmioRead
    | MmioWrite
    | Hlt
    | Shutdown
    | SystemEvent
    | InternalError
    | FailEntry
    | Interrupted
    | Unhandled
)
