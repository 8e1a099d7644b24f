"""Tiny hand-assembled real-mode guests on the host's /dev/kvm, run through evmm's reactor and vCPU threads.

A PVM-based KVM emulates ring-0 code slowly but correctly, so a few hundred instructions are quick; these
guests exercise the KVM layer, the exit channel and the buses without a Linux kernel.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from evmm.devices.bus import EVERYTHING_ON_VCPU, Bus
from evmm.kvm import Kvm
from evmm.loop.vcpu_thread import KICK_SIGNAL, StopRequest
from evmm.machine.config import MachineConfig
from evmm.machine.lifecycle import Lifecycle
from evmm.machine.machine import Machine, MachineParts
from evmm.memory import GuestMemory
from tests.loops import watched_loop

RAM_SIZE = 0x10000
CODE_ADDR = 0x1000
FINISH_PORT = 0x42


@dataclass
class Tiny:
    machine: Machine
    memory: GuestMemory
    pio: Bus
    mmio: Bus
    loop: asyncio.AbstractEventLoop
    reactor_threads: set[str] = field(default_factory=set)

    def run(self, timeout: float = 20.0) -> StopRequest:
        return self.loop.run_until_complete(asyncio.wait_for(self.machine.run(), timeout))


class Finish:
    """Writing the finish port ends the VM with the value written as the exit code."""

    on_vcpu = EVERYTHING_ON_VCPU  # Machine.stop is safe from any thread

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._lifecycle.stop(value, "finish port")


@contextmanager
def tiny_guest(code: bytes, *, irqchip: bool = True, data: dict[int, bytes] | None = None) -> Iterator[Tiny]:
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    if irqchip:
        vm.create_irqchip()
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    vm.set_user_memory_region(0, 0, memory.regions[0].buffer)
    memory.write(CODE_ADDR, code)
    for addr, blob in (data or {}).items():
        memory.write(addr, blob)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = CODE_ADDR, 0x2, 0xF000
    vcpu.set_regs(regs)
    pio, mmio = Bus("pio"), Bus("mmio")
    lifecycle = Lifecycle()
    finish = Finish(lifecycle)
    pio.insert(FINISH_PORT, 1, finish, "finish")
    loop, loop_errors = watched_loop("uvloop")
    parts = MachineParts(
        config=MachineConfig(kernel=Path("/dev/null")),
        kvm=kvm,
        vm=vm,
        memory=memory,
        vcpus=[vcpu],
        pio=pio,
        mmio=mmio,
        lifecycle=lifecycle,
    )
    machine = Machine(parts, loop)
    try:
        yield Tiny(machine, memory, pio, mmio, loop)
    finally:
        machine.stop(0, "test over")
        loop.run_until_complete(asyncio.sleep(0))
        machine.close()
        loop.close()
    loop_errors.check()
