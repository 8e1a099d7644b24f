"""Every legacy device's state through its persist functions, via msgpack (as in a state file), into a fresh
device: the copy answers the guest as the original does, drives its interrupt line to the same level, and
refuses a malformed or other-version state in one line.  The CPU-feature check and the KVM records too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest

from evmm.devices.acpi_pm import AcpiPm
from evmm.devices.acpi_pm_persist import restore as restore_pm
from evmm.devices.acpi_pm_persist import restore_boot_timer, save_boot_timer
from evmm.devices.acpi_pm_persist import save as save_pm
from evmm.devices.boot_timer import BOOT_MARKER, BootTimer
from evmm.devices.legacy import i8042_persist, rtc_persist, serial_persist
from evmm.devices.legacy import serial as uart
from evmm.devices.legacy.i8042 import I8042
from evmm.devices.legacy.rtc import B_24H, B_UIE, REG_B, REG_C, REG_SECONDS, Rtc
from evmm.devices.legacy.serial import Serial
from evmm.kvm.state import VcpuState, VmState
from evmm.kvm.types import CpuidEntry, DTable, Regs, Segment, Sregs
from evmm.snapshot.cpu import check_cpu, missing_features, vcpu_from_map, vcpu_to_map, vm_from_map, vm_to_map
from evmm.snapshot.format import SnapshotError
from tests.fakes.devices import CallCounter, FakeClock, RecordingOutput, TimerRequests
from tests.fakes.irq import RecordingInterrupt, RecordingIrqLine


def through_msgpack(state: dict[str, Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False)


def refuses_bad_states(
    restore: Callable[[Any, object, str], None], device: Any, state: dict[str, Any]
) -> None:
    """Another version, a missing field and a non-map are each one ``SnapshotError`` line naming ``where``."""
    for bad, message in (
        ({**state, "v": 99}, r"^snapshot D: dev: state version 99; this evmm restores version 1$"),
        (
            {k: v for k, v in state.items() if k != sorted(k for k in state if k != "v")[0]},
            r"^snapshot D: dev: no ",
        ),
        ([1, 2], r"^snapshot D: dev: not a map$"),
    ):
        with pytest.raises(SnapshotError, match=message):
            restore(device, bad, "snapshot D: dev")


# ---- 16550A ---------------------------------------------------------------------------------------------------


def test_the_uart_comes_back_with_its_fifo_registers_and_interrupt() -> None:
    irq = RecordingIrqLine()
    a = Serial(irq, RecordingOutput())
    a.write(uart.LCR, 1, 0x03)
    a.write(uart.FCR, 1, 0xC1)  # FIFO on, trigger level 14
    a.write(uart.MCR, 1, uart.MCR_OUT2 | uart.MCR_DTR)
    a.write(uart.SCR, 1, 0x5A)
    a.write(uart.IER, 1, uart.IER_RDI)
    assert a.receive(b"typed") == 5
    assert irq.level  # character timeout: fewer bytes than the trigger level
    state = through_msgpack(serial_persist.save(a))

    irq_b = RecordingIrqLine()
    b = Serial(irq_b, RecordingOutput())
    serial_persist.restore(b, state, "snapshot D: com1")
    assert irq_b.level, "the restored UART must drive its line as the original did"
    for reg in (uart.IER, uart.LCR, uart.MCR, uart.SCR, uart.IIR):
        assert b.read(reg, 1) == a.read(reg, 1), reg
    assert bytes(b.read(uart.RBR, 1) for _ in range(5)) == b"typed"
    assert not irq_b.level  # the FIFO drained: the line drops, as on the original
    refuses_bad_states(serial_persist.restore, Serial(RecordingIrqLine(), RecordingOutput()), state)


# ---- RTC -----------------------------------------------------------------------------------------------------


def test_the_rtc_keeps_the_guest_clock_offset_and_its_interrupt_state() -> None:
    clock = FakeClock(1_700_000_000.25)
    irq = RecordingIrqLine()
    a = Rtc(irq, now=clock)
    a.set_timer_callback(TimerRequests())
    a.write(0, 1, REG_B)
    a.write(1, 1, B_24H | B_UIE)
    a.write(0, 1, 0x20)
    a.write(1, 1, 0x77)  # CMOS RAM byte
    clock.advance(1.0)
    a.poll()
    assert irq.level  # an update-ended interrupt, not yet acknowledged
    a.write(0, 1, REG_SECONDS)
    seconds = a.read(1, 1)
    state = through_msgpack(rtc_persist.save(a))

    clock_b = FakeClock(clock.t + 3600.0)  # the snapshot is restored an hour later
    irq_b = RecordingIrqLine()
    b = Rtc(irq_b, now=clock_b)
    timer = TimerRequests()
    b.set_timer_callback(timer)
    rtc_persist.restore(b, state, "snapshot D: rtc")
    assert irq_b.level
    assert timer.last is None  # UF is still set: no further update interrupt to time until C is read
    b.write(0, 1, 0x20)
    assert b.read(1, 1) == 0x77
    b.write(0, 1, REG_SECONDS)
    assert b.read(1, 1) == seconds  # an hour on: the same second of the minute, the guest's wall clock
    b.write(0, 1, REG_C)
    assert b.read(1, 1) & 0x90 == 0x90  # IRQF and UF, as the original would have answered
    assert not irq_b.level
    assert timer.last is not None and 0 < timer.last <= 1.0  # now the next update-ended interrupt is due
    refuses_bad_states(rtc_persist.restore, Rtc(RecordingIrqLine(), now=clock_b), state)


# ---- i8042 ---------------------------------------------------------------------------------------------------


def test_the_i8042_keeps_bytes_in_flight_and_its_scancode_set() -> None:
    irq = RecordingIrqLine()
    a = I8042(irq, CallCounter())
    a.data_port.write(0, 1, 0xF0)  # keyboard: set scancode set ...
    a.data_port.write(0, 1, 0x01)  # ... 1: two ACKs queued, IRQ 1 up
    a.command_port.write(0, 1, 0x20)  # read CTR: a controller reply, queued ahead of keyboard bytes
    assert irq.level
    state = through_msgpack(i8042_persist.save(a))

    irq_b = RecordingIrqLine()
    b = I8042(irq_b, CallCounter())
    i8042_persist.restore(b, state, "snapshot D: i8042")
    assert irq_b.level
    read_a = [a.data_port.read(0, 1) for _ in range(4)]
    read_b = [b.data_port.read(0, 1) for _ in range(4)]
    assert read_b == read_a
    assert b.ctrl_alt_del() and a.ctrl_alt_del()
    assert [b.data_port.read(0, 1) for _ in range(3)] == [a.data_port.read(0, 1) for _ in range(3)]
    refuses_bad_states(i8042_persist.restore, I8042(RecordingIrqLine(), CallCounter()), state)


# ---- ACPI block and boot timer ---------------------------------------------------------------------------------


def test_an_unread_power_button_event_and_a_fired_boot_marker_survive() -> None:
    a = AcpiPm(RecordingInterrupt(), CallCounter(), CallCounter())
    a.power_button()
    a.write(0, 1, 5 << 2)  # SLP_TYP 5 without SLP_EN
    b = AcpiPm(RecordingInterrupt(), CallCounter(), CallCounter())
    restore_pm(b, through_msgpack(save_pm(a)), "snapshot D: acpi")
    assert b.read(0, 1) == 5 << 2
    assert b.read(3, 1) == 1  # the power button, still unread

    fired = CallCounter()
    t = BootTimer(CallCounter())
    t.write(0, 1, BOOT_MARKER)
    u = BootTimer(fired)
    restore_boot_timer(u, through_msgpack(save_boot_timer(t)), "snapshot D: boot timer")
    u.write(0, 1, BOOT_MARKER)
    assert fired.count == 0  # a restored guest's marker was counted by the VM that booted it
    refuses_bad_states(restore_pm, b, save_pm(a))


# ---- KVM records and the CPU check --------------------------------------------------------------------------


def cpuid(*entries: tuple[int, int, int, int, int, int]) -> list[CpuidEntry]:
    vendor = CpuidEntry(0, 0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD"
    return [vendor, *(CpuidEntry(f, i, 0, a, b, c, d) for f, i, a, b, c, d in entries)]


def test_features_the_host_lacks_are_named_and_dynamic_bits_are_not() -> None:
    host = cpuid((1, 0, 0, 0, 1 << 20, 1 << 26), (7, 0, 0, 1 << 5, 0, 0))
    used = cpuid(
        (
            1,
            0,
            0,
            0,
            (1 << 20) | (1 << 28) | (1 << 27) | (1 << 31),
            1 << 26,
        ),  # sse4_2, avx, OSXSAVE, hypervisor
        (7, 0, 0, (1 << 5) | (1 << 16) | (1 << 1), 1 << 4, 0),  # avx2, avx512f, bit 1, OSPKE
    )
    assert missing_features(tuple(used), host) == ["avx", "CPUID 0x7.0 EBX bit 1", "avx512f"]
    with pytest.raises(
        SnapshotError, match=r"^snapshot D: the guest uses CPU features this host's KVM lacks: avx, "
    ):
        check_cpu("snapshot D", tuple(used), host)
    check_cpu("snapshot D", tuple(host), host)
    intel = [CpuidEntry(0, 0, 0, 0x10, 0x756E6547, 0x6C65746E, 0x49656E69), *host[1:]]
    with pytest.raises(SnapshotError, match=r"made on a AuthenticAMD CPU; this host's is GenuineIntel"):
        check_cpu("snapshot D", tuple(host), intel)


def test_kvm_records_go_through_a_map_unchanged() -> None:
    sregs = Sregs(cr0=0x80050033, cr3=0x1000, efer=0xD01, apic_base=0xFEE00900, interrupt_bitmap=(1, 0, 0, 2))
    sregs.cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=11, present=1, l=1, g=1, s=1)
    sregs.gdt = DTable(0x500, 31)
    vcpu = VcpuState(
        index=1,
        cpuid=tuple(cpuid((1, 0, 1, 2, 3, 4))),
        mp_state=3,
        regs=Regs(rip=0xFFFFFFFF81000000, rsp=0x8000, rflags=0x246, r15=(1 << 64) - 1),
        sregs=sregs,
        xsave=bytes(range(256)) * 16,
        xcrs=b"x" * 392,
        debugregs=b"d" * 128,
        lapic=b"l" * 1024,
        msrs=((0x10, 123456789), (0x6E0, 99)),
        vcpu_events=b"e" * 64,
        tsc_khz=2_600_000,
    )
    assert vcpu_from_map(through_msgpack(vcpu_to_map(vcpu)), "snapshot D: vcpu 1") == vcpu
    vm = VmState(b"m" * 520, b"s" * 520, b"i" * 520, b"p" * 112, clock=5_000_000_000, saved_at=1 << 60)
    assert vm_from_map(through_msgpack(vm_to_map(vm)), "snapshot D: vm") == vm
    broken = vcpu_to_map(vcpu)
    broken["msrs"] = [[0x10]]
    with pytest.raises(SnapshotError, match=r"^snapshot D: vcpu 1: msrs holds a malformed entry$"):
        vcpu_from_map(broken, "snapshot D: vcpu 1")
    assert dataclasses.replace(vcpu, index=2) != vcpu  # the comparison above can fail
