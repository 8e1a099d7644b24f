"""PIO and MMIO exits reach devices on the buses through the reactor, and results return to the guest."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

from cffi import FFI

from evmm import exitcodes
from evmm.devices.bus import EVERYTHING_ON_VCPU, ON_REACTOR, OnVcpu
from tests.kvm.tiny import CODE_ADDR, FINISH_PORT, tiny_guest

_ffi = FFI()  # ABI mode: for a callback that stands in for a hook's C function


class Recorder:
    """A device that records accesses with the thread they ran on and answers reads with fixed values."""

    def __init__(self, answers: dict[int, int] | None = None, on_vcpu: OnVcpu = ON_REACTOR) -> None:
        self.on_vcpu = on_vcpu
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self.answers = answers or {}

    def read(self, offset: int, size: int) -> int:
        self.threads.add(threading.current_thread().name)
        self.reads.append((offset, size))
        return self.answers.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.writes.append((offset, size, value))


# 16-bit real-mode program: PIO write, PIO read stored at 0x500, MMIO write, MMIO read stored at 0x502,
# a 5-byte `rep outsb`, then the finish port.
PROGRAM = bytes.fromhex(
    "b05a"  # mov al, 0x5a
    "e640"  # out 0x40, al
    "e441"  # in al, 0x41
    "a20005"  # mov [0x500], al
    "b80020"  # mov ax, 0x2000
    "8ed8"  # mov ds, ax              (linear base 0x20000: not RAM, so MMIO)
    "c70610003412"  # mov word [0x10], 0x1234
    "a12000"  # mov ax, [0x20]
    "31db"  # xor bx, bx
    "8edb"  # mov ds, bx
    "a30205"  # mov [0x502], ax
    "be0006"  # mov si, 0x600
    "b90500"  # mov cx, 5
    "ba4300"  # mov dx, 0x43
    "f36e"  # rep outsb
    "b007"  # mov al, 7
    f"e6{FINISH_PORT:02x}"  # out FINISH_PORT, al
    "f4"
)


def test_pio_and_mmio_reach_reactor_devices_and_answers_reach_the_guest() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        pio_dev = Recorder({1: 0xA7})
        mmio_dev = Recorder({0x20: 0xBEEF})
        string_dev = Recorder()
        t.pio.insert(0x40, 2, pio_dev, "test-pio")
        t.pio.insert(0x43, 1, string_dev, "test-string")
        t.mmio.insert(0x20000, 0x100, mmio_dev, "test-mmio")
        result = t.run()
        assert result.code == 7
        assert pio_dev.writes == [(0, 1, 0x5A)]
        assert pio_dev.reads == [(1, 1)]
        assert t.memory.read(0x500, 1) == b"\xa7"
        assert mmio_dev.writes == [(0x10, 2, 0x1234)]
        assert mmio_dev.reads == [(0x20, 2)]
        assert struct.unpack("<H", t.memory.read(0x502, 2))[0] == 0xBEEF
        assert [w[2] for w in string_dev.writes] == list(b"hello")
        # Devices that declare nothing run on the reactor (this, the main thread), never on the vCPU thread.
        assert pio_dev.threads == mmio_dev.threads == {threading.current_thread().name}


def test_a_device_served_on_the_vcpu_runs_on_the_vcpu_thread() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        pio_dev = Recorder({1: 0x33}, EVERYTHING_ON_VCPU)
        t.pio.insert(0x40, 2, pio_dev, "test-pio")
        assert t.run().code == 7
        assert t.memory.read(0x500, 1) == b"\x33"
        assert pio_dev.threads == {"vcpu0"}


class SplitRecorder(Recorder):
    """Reads of 0x20 are served on the vCPU thread, everything else on the reactor (as virtio-mmio's ISR)."""

    def __init__(self) -> None:
        super().__init__({0x10: 0xAAAA, 0x20: 0xC0DE}, OnVcpu(reads=frozenset({0x20})))
        self.by_thread: list[tuple[str, str, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.by_thread.append((threading.current_thread().name, "r", offset))
        return super().read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.by_thread.append((threading.current_thread().name, "w", offset))
        super().write(offset, size, value)


def test_a_device_serves_the_registers_it_declares_on_the_vcpu_thread_and_the_rest_on_the_reactor() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        dev = SplitRecorder()
        t.mmio.insert(0x20000, 0x100, dev, "test-split")
        assert t.run().code == 7
        assert struct.unpack("<H", t.memory.read(0x502, 2))[0] == 0xC0DE
        reactor = threading.current_thread().name
        assert dev.by_thread == [(reactor, "w", 0x10), ("vcpu0", "r", 0x20)]


class CallbackHook:
    """An exit hook whose "C function" is a cffi callback into Python: the generic hook on a real KVM_RUN."""

    pio = False

    def __init__(self, base: int, length: int, answer: int) -> None:
        self.base, self.length = base, length
        self.seen: list[tuple[int, int, int]] = []

        def access(ctx: object, is_write: int, offset: int, size: int, data: object) -> int:
            self.seen.append((is_write, offset, size))
            if is_write:
                return 0  # left to Python
            _ffi.memmove(data, answer.to_bytes(size, "little"), size)
            return 1

        self._fn = _ffi.callback("int(void *, int, uint64_t, uint32_t, uint8_t *)", access)

    @property
    def c_function(self) -> int:
        return int(_ffi.cast("uintptr_t", self._fn))

    @property
    def c_context(self) -> int:
        return 0


def test_an_exit_hook_answers_the_accesses_it_takes_and_leaves_the_rest_to_python() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        dev = Recorder()
        t.mmio.insert(0x20000, 0x100, dev, "test-mmio")
        hook = CallbackHook(0x20020, 4, 0xF00D)
        vcpu = t.machine.parts.vcpus[0]
        vcpu.set_exit_hooks([hook])
        assert t.run().code == 7
        assert struct.unpack("<H", t.memory.read(0x502, 2))[0] == 0xF00D  # the hook's answer
        assert hook.seen == [(0, 0, 2)]  # only the read inside its range, as an offset
        assert dev.reads == [] and dev.writes == [(0x10, 2, 0x1234)]  # the write outside it reached Python
        assert vcpu.hooked_exits == 1


def test_unclaimed_ports_and_mmio_read_all_ones() -> None:
    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        assert t.run().code == 7
        assert t.memory.read(0x500, 1) == b"\xff"
        assert t.memory.read(0x502, 2) == b"\xff\xff"


def test_a_device_that_raises_stops_the_vm_with_a_vmm_fault_not_a_dead_thread() -> None:
    class Broken(Recorder):
        def read(self, offset: int, size: int) -> int:
            raise ValueError("bug in a device model")

    with tiny_guest(PROGRAM, data={0x600: b"hello"}) as t:
        t.pio.insert(0x40, 2, Broken(), "broken")
        result = t.run()
        assert result.code == exitcodes.EXIT_VMM_FAULT
        assert "ValueError: bug in a device model" in result.message


# A guest that counts forever: inc dword [0x700]; jmp back.
COUNTER = bytes.fromhex("66ff060007ebf9")


def _counter(t: object) -> int:
    return int(struct.unpack("<I", t.memory.read(0x700, 4))[0])  # type: ignore[attr-defined]


def test_pause_parks_the_vcpu_and_resume_continues() -> None:
    with tiny_guest(COUNTER) as t:
        m = t.machine

        async def scenario() -> tuple[int, int, int, int]:
            runner = asyncio.ensure_future(m.run())
            await asyncio.sleep(0.3)
            await m.pause()
            assert m.state == "paused"
            a = _counter(t)
            await asyncio.sleep(0.3)
            b = _counter(t)
            await m.resume()
            await asyncio.sleep(0.3)
            c = _counter(t)
            m.stop(0, "done")
            result = await runner
            return a, b, c, result.code

        a, b, c, code = t.loop.run_until_complete(asyncio.wait_for(scenario(), 20))
        assert a > 0, "the guest never ran"
        assert a == b, "the counter advanced while paused"
        assert c > b, "the counter did not advance after resume"
        assert code == 0


def test_query_vm_shows_a_paused_vcpus_registers_and_not_a_running_ones() -> None:
    with tiny_guest(COUNTER) as t:
        m = t.machine

        async def scenario() -> tuple[object, object]:
            runner = asyncio.ensure_future(m.run())
            await asyncio.sleep(0.3)
            running = m.describe()["vcpus"][0]["registers"]
            await m.pause()
            paused = m.describe()["vcpus"][0]["registers"]
            m.stop(0, "done")
            await runner
            return running, paused

        running, paused = t.loop.run_until_complete(asyncio.wait_for(scenario(), 20))
        assert running is None  # reading a running vCPU would wait for its next exit
        assert isinstance(paused, dict)
        # The guest loops over its 7 bytes of real-mode code; RIP is inside them, the stack where tiny put it.
        assert CODE_ADDR <= paused["rip"] < CODE_ADDR + len(COUNTER)
        assert paused["rsp"] == 0xF000
        assert paused["cr0"] & 1 == 0  # real mode


def test_stop_from_another_thread_interrupts_a_running_vcpu() -> None:
    with tiny_guest(COUNTER) as t:
        threading.Timer(0.2, t.machine.stop, args=(9, "from a timer thread")).start()
        start = time.monotonic()
        result = t.run()
        assert result.code == 9
        assert time.monotonic() - start < 5
