#!/usr/bin/env python3
"""What one port-I/O exit costs evmm (not a test): python scripts/bench_exits.py [N]

A tiny real-mode guest prints N bytes the way Linux's serial console does (read LSR, write THR: two exits per
byte) on this host's /dev/kvm; a PVM KVM runs it too (the guest's own ring-0 loop is a few instructions per
exit).  The same guest runs five ways, from the bare minimum to what ``evmm run`` does:

  1. a bare KVM_RUN loop on the main thread (cffi ioctl, exit decoded, answered)
  2. the same on a thread of its own (where evmm's vCPUs run)
  3. evmm's vCPU thread and buses with a null device served on the vCPU thread
  4. evmm's vCPU thread with the 16550A model in Python (and the console ring)
  5. as 4, with the UART fast path in C (evmm/devices/legacy/serial_fast.py)

Inside the KVM test host: evmm testhost run -- python scripts/bench_exits.py 5000
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evmm.devices.bus import EVERYTHING_ON_VCPU
from evmm.devices.legacy.serial import Serial
from evmm.devices.legacy.serial_fast import UartFastPath
from evmm.kvm import Kvm, Vcpu, exits
from evmm.memory import GuestMemory
from tests.fakes.irq import RecordingIrqLine
from tests.kvm.tiny import FINISH_PORT, tiny_guest

COM1 = 0x3F8
CODE = 0x1000


def program(n: int) -> bytes:
    """mov cx, n; L: mov dx, LSR; in al, dx; mov dx, THR; mov al, 'x'; out dx, al; loop L; finish."""
    body = bytes([0xBA]) + (COM1 + 5).to_bytes(2, "little") + bytes([0xEC])
    body += bytes([0xBA]) + COM1.to_bytes(2, "little") + bytes([0xB0, 0x78, 0xEE])
    code = bytes([0xB9]) + n.to_bytes(2, "little") + body + bytes([0xE2, (256 - len(body) - 2) & 0xFF])
    return code + bytes([0xB0, 0x00, 0xE6, FINISH_PORT, 0xF4])


class Null:
    on_vcpu = EVERYTHING_ON_VCPU

    def read(self, offset: int, size: int) -> int:
        return 0x60

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def bare_vcpu(n: int) -> tuple[Vcpu, Callable[[], None]]:
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    vm.create_irqchip()
    mem = GuestMemory.anonymous([(0, 0x10000)])
    vm.set_user_memory_region(0, 0, mem.regions[0].buffer)
    mem.write(CODE, program(n))
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = CODE, 0x2, 0xF000
    vcpu.set_regs(regs)

    def close() -> None:
        vcpu.close()
        vm.close()
        mem.close()
        kvm.close()

    return vcpu, close


def bare_loop(vcpu: Vcpu) -> int:
    count = 0
    while True:
        ex = vcpu.run()
        count += 1
        if type(ex) is exits.IoIn:
            vcpu.complete_io_in(b"\x60")
        elif type(ex) is exits.IoOut:
            if ex.port == FINISH_PORT:
                return count
        elif type(ex) is exits.Interrupted:
            vcpu.set_immediate_exit(False)
        else:
            raise RuntimeError(f"unexpected exit {ex}")


def timed_bare(n: int, *, thread: bool) -> float:
    vcpu, close = bare_vcpu(n)
    try:
        result: list[float] = []

        def go() -> None:
            t = time.perf_counter()
            bare_loop(vcpu)
            result.append(time.perf_counter() - t)

        if thread:
            th = threading.Thread(target=go)
            th.start()
            th.join()
        else:
            go()
        return result[0]
    finally:
        close()


def timed_evmm(n: int, device: str) -> tuple[float, int]:
    with tiny_guest(program(n)) as t:
        fast = UartFastPath(COM1) if device == "fast" else None
        if device == "null":
            t.pio.insert(COM1, 8, Null(), "com1")
        else:
            out = fast.put if fast is not None else (lambda data: None)
            t.pio.insert(COM1, 8, Serial(RecordingIrqLine(), out, fast=fast), "com1")
        vcpu = t.machine.parts.vcpus[0]
        vcpu.set_exit_hooks([fast] if fast is not None else [])
        started = time.perf_counter()
        t.run(600)
        return time.perf_counter() - started, vcpu.hooked_exits


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    exits_total = 2 * n
    print(f"{n} bytes, {exits_total} port-I/O exits each way:")
    rows = [
        ("bare KVM_RUN loop, main thread", timed_bare(n, thread=False), 0),
        ("bare KVM_RUN loop, own thread", timed_bare(n, thread=True), 0),
    ]
    for label, device in (
        ("evmm vCPU thread, null device", "null"),
        ("evmm vCPU thread, 16550A in Python", "serial"),
        ("evmm vCPU thread, 16550A + C fast path", "fast"),
    ):
        seconds, fast = timed_evmm(n, device)
        rows.append((label, seconds, fast))
    for label, seconds, fast in rows:
        extra = f"  ({fast} answered in C)" if fast else ""
        print(f"  {label:42s} {seconds / exits_total * 1e6:7.1f} us/exit{extra}")


if __name__ == "__main__":
    main()
