"""The UART fast path on a real KVM_RUN loop: Linux's console pattern (read LSR until THRE, write THR).

A tiny real-mode guest prints a message the way serial8250_console_write does; with the fast path attached
the bytes arrive in order and nearly every exit is answered in C.  Then the guest turns on THRE interrupts
and DLAB, where the model must see the accesses itself again.
"""

from __future__ import annotations

from evmm.devices.legacy.serial import Serial
from evmm.devices.legacy.serial_fast import UartFastPath
from tests.fakes.irq import RecordingIrqLine
from tests.kvm.tiny import FINISH_PORT, tiny_guest

COM1 = 0x3F8
MESSAGE = b"evmm says hello through the fast path\r\n"
MSG_ADDR = 0x600


def console_write_program(extra: bytes = b"") -> bytes:
    """mov si, MSG; mov cx, len; L: mov dx, LSR; W: in al, dx; test al, 0x20; jz W; lodsb; mov dx, THR;
    out dx, al; loop L; <extra>; mov al, 0; out FINISH, al; hlt"""
    code = bytes([0xBE]) + MSG_ADDR.to_bytes(2, "little")
    code += bytes([0xB9]) + len(MESSAGE).to_bytes(2, "little")
    loop = bytes([0xBA]) + (COM1 + 5).to_bytes(2, "little")  # mov dx, LSR
    loop += bytes([0xEC, 0xA8, 0x20, 0x74, 0xFB])  # W: in al, dx; test al, 0x20; jz W
    loop += bytes([0xAC])  # lodsb
    loop += bytes([0xBA]) + COM1.to_bytes(2, "little") + bytes([0xEE])  # mov dx, THR; out dx, al
    code += loop + bytes([0xE2, (256 - len(loop) - 2) & 0xFF])  # loop L
    return code + extra + bytes([0xB0, 0x00, 0xE6, FINISH_PORT, 0xF4])


def out_byte(port: int, value: int) -> bytes:
    return bytes([0xBA]) + port.to_bytes(2, "little") + bytes([0xB0, value, 0xEE])  # mov dx; mov al; out


def run(code: bytes) -> tuple[bytes, int, int, RecordingIrqLine, Serial]:
    fast = UartFastPath(COM1)
    irq = RecordingIrqLine()
    serial = Serial(irq, fast.put, fast=fast)
    with tiny_guest(code, data={MSG_ADDR: MESSAGE}) as t:
        t.pio.insert(COM1, 8, serial, "com1")
        vcpu = t.machine.parts.vcpus[0]
        vcpu.set_exit_hooks([fast])
        assert t.run().code == 0
        return fast.take(), vcpu.hooked_exits, t.machine.threads[0].exit_count, irq, serial


def test_console_bytes_arrive_in_order_and_the_exits_stay_in_c() -> None:
    out, fast_exits, python_exits, _, _ = run(console_write_program())
    assert out == MESSAGE
    assert fast_exits == 2 * len(MESSAGE)  # one LSR read (THRE is always set) and one THR write per byte
    assert python_exits <= 2  # the finish port (and at most one interrupted run)


def test_with_thre_interrupts_on_the_model_sees_the_writes_that_raise_the_line() -> None:
    # OUT2 and THRE interrupts on, read IIR (clears the pending THRE), then write one more byte: that write
    # raises the line again, so it must go through the model, which raises IRQ 4.
    extra = out_byte(COM1 + 4, 0x08) + out_byte(COM1 + 1, 0x02)
    extra += bytes([0xBA]) + (COM1 + 2).to_bytes(2, "little") + bytes([0xEC])  # in al, IIR
    extra += out_byte(COM1, ord("!"))
    out, fast_exits, python_exits, irq, _ = run(console_write_program(extra))
    assert out == MESSAGE + b"!"
    assert fast_exits == 2 * len(MESSAGE)
    assert irq.changes == [True, False, True]  # THRE raised by enabling, cleared by IIR, raised by the write
    assert python_exits >= 4


def test_dlab_writes_reach_the_divisor_not_the_output() -> None:
    extra = out_byte(COM1 + 3, 0x80) + out_byte(COM1, 0x01) + out_byte(COM1 + 3, 0x03)
    out, _, _, _, serial = run(console_write_program(extra))
    assert out == MESSAGE
    serial.write(3, 1, 0x80)
    assert serial.read(0, 1) == 0x01  # the divisor latch got the byte
