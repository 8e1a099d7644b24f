"""A 16550A UART: the guest's ttyS0, as a pure register model.

The register file, the interrupt priorities and the interrupt set/clear rules follow the National PC16550D
datasheet (Table II "Summary of registers", Table IV "Interrupt control functions").  What Linux needs of it
was checked against drivers/tty/serial/8250/8250_port.c:

* ``autoconfig()`` writes ``MCR = LOOP | OUT2 | RTS`` and expects ``MSR & 0xF0 == DCD | CTS`` (loopback wires
  RTS to CTS, DTR to DSR, OUT1 to RI and OUT2 to DCD); it then sets ``FCR = ENABLE_FIFO`` and reads IIR bits
  7:6 == 0b11 to call the part a 16550A.  ``autoconfig_16550a()`` probes for EFR/XScale/16750 extras: IER bits
  7:4 and IIR bits 5:4 must read as zero, which is what a plain 16550A does.
* ``serial8250_do_startup()`` checks that enabling IER.THRI with THR empty raises a THRE interrupt at once,
  that reading IIR clears it and that re-enabling IER.THRI raises it again (otherwise it falls back to
  polling with a timer, UART_BUG_THRE/UART_BUG_TXEN), and then sets MCR.OUT2 before it relies on interrupts.

Interrupt output: on a PC the 16550's INTR pin reaches the PIC through a buffer enabled by OUT2, so the line
is driven high only while an enabled interrupt is pending *and* MCR.OUT2 is set *and* the UART is not in
loopback (which forces OUT2 inactive, datasheet MCR bit 4).  Linux sets OUT2 in startup before it enables
interrupts, so gating costs Linux nothing and keeps the line quiet while the driver probes.

Transmission is instant: a THR write hands the byte to ``output`` and THR/TSR are empty again by the time the
guest's ``outb`` returns, so LSR.THRE and LSR.TEMT always read 1 and a THRE interrupt is pending again after
every write.  Linux's ``serial8250_tx_chars()`` writes up to 16 bytes per interrupt, so console output is
interrupt-driven, one interrupt per 16 bytes, and the tty layer never busy-polls.

Reception: ``receive()`` puts terminal bytes into the 16-byte RX FIFO (1 byte in 16450 mode), taking only
what fits.  The FIFO is never overrun by the host: the caller keeps the rest and is told through the
rx-space callback when the guest has drained the FIFO.  An RX interrupt is reported as soon as there is
data: as "received data available" at or above the FCR trigger level and as "character timeout" below it,
since no further character will arrive to fill the FIFO (the 4-character timeout is taken as elapsed).

Fast path: the two accesses Linux's console makes per byte (read LSR, write THR) may be answered in C on the
vCPU thread (serial_fast.py and serial_fast.c) when they change nothing the model must compute: ``_sync_fast``
tells C, after every change of state, whether a THR write now leaves the interrupt line alone (DLAB clear, no
loopback, THRE interrupts off or already pending) and what an LSR read returns when it has no errors to
clear.  A THR write taken in C leaves the model's state as it was: THRE pending if THRE interrupts are on
(the byte leaves at once), and with them off the THRE-pending flag is unobservable (enabling them sets it).
Without a fast path the model handles every access itself.

Threads: the UART is served on vCPU threads (``on_vcpu``) while ``receive`` runs on the reactor.  All register
state is guarded by one lock.  Nothing calls out while holding it: ``output``, the rx-space callback and
``irq.set_level`` run after it is released.  To keep level changes in order when two threads race, each
change of the computed level gets a generation number under the state lock, and a second small lock applies
only a generation newer than the last one applied; so the line always ends at the most recently computed
level, and ``set_level`` is called only when the line really changes.  Output calls are serialised by their
own lock, so ``output`` need not be thread-safe; it runs on a vCPU thread and must not block for long.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

from evmm.devices.bus import EVERYTHING_ON_VCPU, read_bytewise, write_bytewise
from evmm.devices.irq import IrqLine

REGISTER_COUNT = 8  # ports base+0 .. base+7

# Register offsets (DLAB selects DLL/DLM at offsets 0 and 1).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDI = 0x01  # received data available (and character timeout)
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 7:4 are zero on a 16550A (Linux's XScale UUE probe relies on it)

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C  # character timeout: same priority as RDI
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_TRIGGER = 0xC0
_TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 7:6

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# With no loopback the virtual cable always has carrier, a ready peer and clear-to-send, so flow control
# (CRTSCTS) never stalls the guest.
_MSR_CABLE = MSR_DCD | MSR_DSR | MSR_CTS

RX_FIFO_SIZE = 16
_RESET_DIVISOR = 0x0C  # 9600 baud from the 1.8432 MHz clock; the divisor has no effect here


class FastPath(Protocol):
    """What the model tells the C fast path (serial_fast.UartFastPath)."""

    def set(self, thr_fast: bool, lsr_fast: bool, lsr: int) -> None: ...


class Serial:
    """The UART at one 8-port range (COM1: 0x3F8, IRQ 4)."""

    on_vcpu = EVERYTHING_ON_VCPU  # console output costs several exits per byte; one lock guards the state

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None], fast: FastPath | None = None) -> None:
        self._irq = irq
        self._output = output
        self._fast = fast
        self._fast_state: tuple[bool, bool, int] | None = None
        self._lock = threading.Lock()  # guards every register field below
        self._tx_lock = threading.Lock()  # serialises calls to output()
        self._irq_lock = threading.Lock()  # orders set_level() calls (see the module docstring)
        self._rx_space: Callable[[], None] | None = None

        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0  # FCR_ENABLE and FCR_TRIGGER bits as last programmed
        self._scr = 0
        self._dll = _RESET_DIVISOR
        self._dlm = 0
        self._rx: deque[int] = deque()
        self._lsr_errors = 0  # LSR_OE until LSR is read
        self._msr_delta = 0  # MSR bits 3:0 until MSR is read
        self._thr_pending = False  # THRE interrupt pending (Table IV)
        self._rx_waiting = False  # a receive() was cut short: tell the caller when the FIFO drains

        self._level_gen = 0  # generation of the last computed line level
        self._level = False  # last computed line level
        self._applied_gen = 0  # under _irq_lock
        self._line = False  # under _irq_lock: the level the IrqLine was last set to
        self._sync_fast()

    # -- the host side (reactor thread) --------------------------------------------------------------------

    def set_rx_space_callback(self, cb: Callable[[], None]) -> None:
        """``cb()`` is called, with no lock held, when the guest empties the RX FIFO after ``receive`` took
        less than it was offered.  It runs on the vCPU thread that drained the FIFO: schedule, don't block."""
        with self._lock:
            self._rx_space = cb

    def receive(self, data: bytes) -> int:
        """Queue terminal input; return how many leading bytes of ``data`` were taken (the rest is the
        caller's to offer again after the rx-space callback)."""
        with self._lock:
            taken = 0
            if not self._mcr & MCR_LOOP:  # loopback disconnects the serial input (datasheet MCR bit 4)
                taken = min(self._rx_capacity() - len(self._rx), len(data))
                self._rx.extend(data[:taken])
            if taken < len(data):
                self._rx_waiting = True
            update = self._level_update()
            self._sync_fast()
        self._apply_level(update)
        return taken

    # -- the guest side (vCPU threads) ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        # An 8-bit ISA device: a wider access is split into byte cycles, and bytes past the last register
        # float high.
        return read_bytewise(self._read_byte, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, offset, size, value)

    def _read_byte(self, reg: int) -> int:
        if not 0 <= reg < REGISTER_COUNT:
            return 0xFF
        with self._lock:
            value = self._read_register(reg)
            notify = self._take_rx_space_notice()
            update = self._level_update()
            self._sync_fast()
        self._apply_level(update)
        if notify is not None:
            notify()
        return value

    def _write_byte(self, reg: int, value: int) -> None:
        if not 0 <= reg < REGISTER_COUNT:
            return
        with self._lock:
            out = self._write_register(reg, value)
            notify = self._take_rx_space_notice()
            update = self._level_update()
            self._sync_fast()
        if out is not None:
            with self._tx_lock:
                self._output(out)
        self._apply_level(update)
        if notify is not None:
            notify()

    # -- the fast path (called with _lock held) ------------------------------------------------------------

    def _sync_fast(self) -> None:
        if self._fast is None:
            return
        thr_fast = (
            not self._lcr & LCR_DLAB
            and not self._mcr & MCR_LOOP
            and (not self._ier & IER_THRI or self._thr_pending)
        )
        lsr_fast = not self._lsr_errors
        lsr = LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        state = (bool(thr_fast), lsr_fast, lsr)
        if state != self._fast_state:
            self._fast_state = state
            self._fast.set(*state)

    # -- register model (called with _lock held) -----------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR:
            if dlab:
                return self._dll
            return self._rx.popleft() if self._rx else 0
        if reg == IER:
            return self._dlm if dlab else self._ier
        if reg == IIR:
            iir = self._pending_iir()
            if iir == IIR_THRI:
                self._thr_pending = False  # reading IIR clears THRE when it is the source (Table IV)
            return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            lsr = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
            self._lsr_errors = 0  # reading LSR clears OE and so the line status interrupt
            return lsr
        if reg == MSR:
            msr = self._modem_status() | self._msr_delta
            self._msr_delta = 0
            return msr
        return self._scr

    def _write_register(self, reg: int, value: int) -> bytes | None:
        dlab = self._lcr & LCR_DLAB
        if reg == THR:
            if dlab:
                self._dll = value
                return None
            # Writing THR clears a pending THRE; the byte leaves at once, so THRE is pending again.
            self._thr_pending = True
            if self._mcr & MCR_LOOP:
                self._loop_back(value)
                return None
            return bytes((value,))
        if reg == IER:
            if dlab:
                self._dlm = value
                return None
            value &= IER_MASK
            if value & IER_THRI and not self._ier & IER_THRI:
                self._thr_pending = True  # enabling ETBEI with THR empty raises THRE (what Linux tests)
            elif not value & IER_THRI:
                self._thr_pending = False
            self._ier = value
        elif reg == FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            before = self._modem_status()
            self._mcr = value & MCR_MASK
            self._note_modem_change(before, self._modem_status())
        elif reg == SCR:
            self._scr = value
        # LSR and MSR writes are factory-test only: ignored.
        return None

    def _write_fcr(self, value: int) -> None:
        # Datasheet FCR0: switching between FIFO and 16450 mode clears the FIFOs, and the other bits are
        # only programmed while FCR0 is 1.  FCR1 clears the RX FIFO; the TX FIFO is always empty here.
        enable = value & FCR_ENABLE
        if enable != self._fcr & FCR_ENABLE:
            self._rx.clear()
        if not enable:
            self._fcr = 0
            return
        if value & FCR_CLEAR_RX:
            self._rx.clear()
        self._fcr = value & (FCR_ENABLE | FCR_TRIGGER)

    def _loop_back(self, value: int) -> None:
        if len(self._rx) < self._rx_capacity():
            self._rx.append(value)
            return
        # Overrun: in FIFO mode the new character is lost; in 16450 mode it overwrites the holding register.
        self._lsr_errors |= LSR_OE
        if not self._fcr & FCR_ENABLE:
            self._rx[-1] = value

    def _modem_status(self) -> int:
        if not self._mcr & MCR_LOOP:
            return _MSR_CABLE
        mcr = self._mcr
        return (
            (MSR_CTS if mcr & MCR_RTS else 0)
            | (MSR_DSR if mcr & MCR_DTR else 0)
            | (MSR_RI if mcr & MCR_OUT1 else 0)
            | (MSR_DCD if mcr & MCR_OUT2 else 0)
        )

    def _note_modem_change(self, before: int, after: int) -> None:
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if before & MSR_RI and not after & MSR_RI:
            self._msr_delta |= MSR_TERI  # trailing edge of RI only
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD

    def _rx_capacity(self) -> int:
        return RX_FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _pending_iir(self) -> int:
        """The highest-priority enabled pending interrupt (datasheet Table IV)."""
        ier = self._ier
        if ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            if self._fcr & FCR_ENABLE and len(self._rx) < _TRIGGER_LEVELS[self._fcr >> 6]:
                return IIR_CTI
            return IIR_RDI
        if ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_delta:
            return IIR_MSI
        return IIR_NO_INT

    def _take_rx_space_notice(self) -> Callable[[], None] | None:
        if self._rx_waiting and not self._rx and not self._mcr & MCR_LOOP:
            self._rx_waiting = False
            return self._rx_space
        return None

    def _level_update(self) -> tuple[int, bool] | None:
        """The new line level with its generation, if it changed."""
        level = self._pending_iir() != IIR_NO_INT and bool(self._mcr & MCR_OUT2) and not self._mcr & MCR_LOOP
        if level == self._level:
            return None
        self._level = level
        self._level_gen += 1
        return self._level_gen, level

    # -- calling out (no state lock held) ------------------------------------------------------------------

    def _apply_level(self, update: tuple[int, bool] | None) -> None:
        if update is None:
            return
        gen, level = update
        with self._irq_lock:
            if gen <= self._applied_gen:
                return  # a newer level was already applied by another thread
            self._applied_gen = gen
            if level != self._line:
                self._line = level
                self._irq.set_level(level)
