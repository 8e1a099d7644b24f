"""An i8042 keyboard controller with an AT keyboard behind it, enough for Linux, as a pure register model.

The controller has two ports: data at 0x60 and status/command at 0x64.  ``I8042`` is the controller; its
``data_port`` and ``command_port`` attributes are one-register ``BusDevice`` views of it for the builder to map
at those two addresses (port 0x61 between them belongs to another device, so one range cannot cover both).

Commands follow the IBM PC/AT technical reference for the 8042 and what Linux sends
(drivers/input/serio/i8042.c, drivers/input/keyboard/atkbd.c, arch/x86/kernel/reboot.c):

* ``i8042_controller_check()`` flushes the output buffer and gives up if OBF never clears;
  ``i8042_controller_selftest()`` wants 0x55 for 0xAA; ``i8042_controller_init()`` reads the command byte
  (CTR) twice with 0x20, writes it back with 0x60 and warns of a keylock unless status bit 4 is 1.
* There is no AUX (mouse) port: evmm wires no IRQ 12.  Linux's ``i8042_check_aux()`` would otherwise wait
  for a byte or an IRQ that never comes (0.5 s, then 250 ms).  So the AUX loop command 0xD3 answers with the
  byte *not* flagged as AUX data, which ``i8042_command()`` treats as a failed loop at once, and the AUX
  interface test 0xA9 answers 0x01 ("clock line stuck low"), which makes Linux conclude there is no AUX port.
* Reboot (``reboot=k``): Linux waits for IBF clear (always, here) and writes 0xFE to 0x64, up to ten times;
  any 0xF0-0xFF command whose bit 0 is clear pulses the reset line, and so does writing the output port
  (0xD1) with bit 0 clear.  Each pulse calls ``on_reset()``: it must be idempotent.
* The keyboard answers what atkbd sends: 0xFF -> FA AA, 0xF2 -> FA AB 83, 0xEE -> EE, 0xFE -> the last byte
  again, 0xED/0xF3/0xF0 take a parameter, 0xF0 selects scancode set 1 or 2 (set 3 is refused with FE, so
  atkbd stays in set 2), anything else -> FA.
* With CTR bit 6 (XLATE) set the controller translates set 2 into set 1 on the way to the output buffer,
  folding an F0 break prefix into bit 7.  The keyboard here only ever sends the bytes in ``_SET2_TO_SET1`` and
  bytes >= 0x80, which the 8042 passes through, so only their entries of the translation table are kept.

Ctrl-Alt-Del (how Firecracker asks a guest to shut down): ``ctrl_alt_del()`` makes the keyboard send the
make and break codes of Left Ctrl, Left Alt and Delete in its current set.  Through atkbd they become
KEY_LEFTCTRL, KEY_LEFTALT and KEY_DELETE (keycode 111) both translated and untranslated, and Linux's default
keymap (drivers/tty/vt/defkeymap.map) binds ``control alt keycode 111 = Boot``, which calls ``ctrl_alt_del()``
and so signals init (or reboots, with ``ctrl-alt-del`` set to hard).

IRQ 1 is high while the output buffer holds a byte and CTR bit 0 enables the keyboard interrupt; reading the
data port lowers it, and when another byte follows at once the line is raised again, giving a fresh edge.
Threads: one lock guards the state; ``irq.set_level`` is called holding it (it must not call back into this
device) and ``on_reset`` after releasing it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from evmm.devices.irq import IrqLine

STATUS_OBF = 0x01  # output buffer full
STATUS_IBF = 0x02  # input buffer full: never, commands complete at once
STATUS_SYS = 0x04  # system flag: self test passed
STATUS_A2 = 0x08  # the last write was a command (port 0x64)
STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the keylock
STATUS_AUXDATA = 0x20

CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
# What a PC BIOS leaves behind: keyboard interrupt on, POST passed, translation on (no AUX port, so no AUXINT).
_RESET_CTR = CTR_KBDINT | CTR_SYS | CTR_XLATE

OUTPORT_RESET = 0x01  # low = CPU reset asserted
OUTPORT_A20 = 0x02
OUTPORT_OBF = 0x10

KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)
KBD_BUFFER = 16  # bytes a keyboard buffers while its interface is inhibited

# Make codes of Left Ctrl, Left Alt and Delete.  Set 2 breaks are F0-prefixed, set 1 breaks set bit 7.
_CTRL_ALT_DEL = {
    1: (bytes((0x1D,)), bytes((0x38,)), bytes((0xE0, 0x53))),
    2: (bytes((0x14,)), bytes((0x11,)), bytes((0xE0, 0x71))),
}
# Entries of the 8042's set 2 -> set 1 table for every byte below 0x80 this keyboard can send (checked against
# Linux's atkbd_unxlate_table, its inverse): scancode set numbers 1-3, Left Alt, Left Ctrl, Delete, and the
# 0x83 of the keyboard ID (set 2's F7).
_SET2_TO_SET1 = {0x01: 0x43, 0x02: 0x41, 0x03: 0x3F, 0x11: 0x38, 0x14: 0x1D, 0x71: 0x53, 0x83: 0x41}
_BREAK_PREFIX = 0xF0


class I8042Port:
    """One of the controller's two ports, as a one-register bus device."""

    def __init__(self, read: Callable[[], int], write: Callable[[int], None]) -> None:
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        # An 8-bit ISA port: the first byte is the register, bytes beyond it float high.
        value = self._read() if offset == 0 else 0xFF
        return value | (((1 << (8 * size)) - 1) & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._write(value & 0xFF)


class I8042:
    """The keyboard controller; map ``data_port`` at 0x60 and ``command_port`` at 0x64."""

    def __init__(self, irq: IrqLine, on_reset: Callable[[], None]) -> None:
        self._irq = irq
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.data_port = I8042Port(self._read_data, self._write_data)
        self.command_port = I8042Port(self._read_status, self._write_command)

        self._ram = bytearray(32)  # byte 0 is the CTR
        self._ram[0] = _RESET_CTR
        self._sys = True
        self._a2 = False
        self._outport = OUTPORT_RESET | OUTPORT_A20
        self._obf: int | None = None  # the output buffer
        self._last_out = 0  # what a read of an empty output buffer returns
        self._replies: deque[int] = deque()  # controller replies, ahead of keyboard bytes
        self._kbd: deque[int] = deque()  # bytes the keyboard has to send
        self._pending_cmd: int | None = None  # a controller command waiting for its data byte
        self._xlate_break = False  # the translator swallowed an F0
        self._line = False

        self._kbd_param_for: int | None = None  # a keyboard command waiting for its parameter
        self._kbd_set = 2
        self._kbd_scanning = True
        self._kbd_last = KBD_ACK  # for the resend command

    # -- the host side --------------------------------------------------------------------------------------

    def ctrl_alt_del(self) -> bool:
        """Press and release Ctrl-Alt-Del; False if the keyboard is not scanning (the guest disabled it with
        0xF5) or its buffer lacks room, as a real keyboard would drop the keys."""
        with self._lock:
            ctrl, alt, delete = _CTRL_ALT_DEL[self._kbd_set]
            seq = ctrl + alt + delete + self._break(delete) + self._break(alt) + self._break(ctrl)
            if not self._kbd_scanning or len(self._kbd) + len(seq) > KBD_BUFFER:
                return False
            self._kbd.extend(seq)
            self._refill()
            self._sync_line()
        return True

    def _break(self, make: bytes) -> bytes:
        *prefix, code = make
        if self._kbd_set == 1:
            return bytes((*prefix, code | 0x80))
        return bytes((*prefix, _BREAK_PREFIX, code))

    # -- port handlers --------------------------------------------------------------------------------------

    def _read_status(self) -> int:
        with self._lock:
            return (
                (STATUS_OBF if self._obf is not None else 0)
                | (STATUS_SYS if self._sys else 0)
                | (STATUS_A2 if self._a2 else 0)
                | STATUS_UNLOCKED
            )

    def _read_data(self) -> int:
        with self._lock:
            if self._obf is None:
                return self._last_out
            value, self._obf = self._obf, None
            self._last_out = value
            self._sync_line()  # low: the byte is taken ...
            self._refill()
            self._sync_line()  # ... and high again if another follows, a new edge for IRQ 1
            return value

    def _write_command(self, cmd: int) -> None:
        with self._lock:
            self._a2 = True
            self._pending_cmd = None
            reset = self._command(cmd)
            self._refill()
            self._sync_line()
        if reset:
            self._on_reset()

    def _write_data(self, value: int) -> None:
        with self._lock:
            self._a2 = False
            reset = False
            if self._pending_cmd is not None:
                cmd, self._pending_cmd = self._pending_cmd, None
                reset = self._command_data(cmd, value)
            else:
                # Sending to the keyboard enables its interface again, as on the 8042.
                self._ram[0] &= ~CTR_KBDDIS
                self._keyboard(value)
            self._refill()
            self._sync_line()
        if reset:
            self._on_reset()

    # -- the controller (with _lock held) -------------------------------------------------------------------

    def _command(self, cmd: int) -> bool:
        """Run a command written to 0x64; True if it pulsed the reset line."""
        if 0x20 <= cmd <= 0x3F:
            self._replies.append(self._ram[cmd & 0x1F])
        elif 0x60 <= cmd <= 0x7F or cmd in (0xD1, 0xD2, 0xD3, 0xD4):
            self._pending_cmd = cmd
        elif cmd == 0xA7:
            self._ram[0] |= CTR_AUXDIS
        elif cmd == 0xA8:
            self._ram[0] &= ~CTR_AUXDIS
        elif cmd == 0xA9:
            self._replies.append(0x01)  # AUX interface test: no AUX port (see the module docstring)
        elif cmd == 0xAA:
            self._sys = True
            self._replies.append(0x55)  # self test passed
        elif cmd == 0xAB:
            self._replies.append(0x00)  # keyboard interface test passed
        elif cmd == 0xAD:
            self._ram[0] |= CTR_KBDDIS
        elif cmd == 0xAE:
            self._ram[0] &= ~CTR_KBDDIS
        elif cmd == 0xC0:
            self._replies.append(0x80)  # input port: keyboard not inhibited
        elif cmd == 0xD0:
            self._replies.append(self._outport & ~OUTPORT_OBF | (OUTPORT_OBF if self._obf is not None else 0))
        elif cmd == 0xE0:
            self._replies.append(0x00)  # test inputs
        elif cmd >= 0xF0:
            return not cmd & OUTPORT_RESET  # pulse the output port bits whose command bit is 0
        return False

    def _command_data(self, cmd: int, value: int) -> bool:
        """Take the data byte of a two-byte command; True if it asserted reset."""
        if cmd <= 0x7F:
            self._ram[cmd & 0x1F] = value
            if cmd == 0x60:
                self._sys = bool(value & CTR_SYS)
        elif cmd == 0xD1:
            self._outport = value
            return not value & OUTPORT_RESET
        elif cmd in (0xD2, 0xD3):
            # 0xD2 writes the keyboard output buffer; 0xD3 would write the AUX one, but with no AUX port
            # the byte comes back as keyboard data, which Linux reads as a failed AUX loop test.
            self._replies.append(value)
        # 0xD4 sends a byte to the AUX device; there is none.
        return False

    def _refill(self) -> None:
        """Move the next byte into an empty output buffer: controller replies first, then keyboard bytes
        unless the keyboard interface is disabled, translated if CTR.XLATE is set."""
        if self._obf is not None:
            return
        if self._replies:
            self._obf = self._replies.popleft()
            return
        while self._kbd and not self._ram[0] & CTR_KBDDIS:
            b = self._kbd.popleft()
            if not self._ram[0] & CTR_XLATE:
                self._obf = b
                return
            if b == _BREAK_PREFIX:
                self._xlate_break = True
                continue
            self._obf = _SET2_TO_SET1.get(b, b) | (0x80 if self._xlate_break else 0)
            self._xlate_break = False
            return

    def _sync_line(self) -> None:
        level = self._obf is not None and bool(self._ram[0] & CTR_KBDINT)
        if level != self._line:
            self._line = level
            self._irq.set_level(level)

    # -- the keyboard (with _lock held) ---------------------------------------------------------------------

    def _keyboard(self, b: int) -> None:
        cmd, self._kbd_param_for = self._kbd_param_for, None
        if cmd == 0xF0:
            if b == 0:
                self._send(KBD_ACK, self._kbd_set)
            elif b in _CTRL_ALT_DEL:
                self._kbd_set = b
                self._send(KBD_ACK)
            else:
                self._send(KBD_RESEND)  # set 3 is not offered
        elif cmd is not None:
            self._send(KBD_ACK)  # the LED state or typematic rate: accepted and ignored
        elif b == 0xFF:
            self._kbd.clear()
            self._kbd_set, self._kbd_scanning = 2, True
            self._send(KBD_ACK, KBD_BAT_OK)
        elif b == 0xFE:
            self._send(self._kbd_last)
        elif b == 0xF2:
            self._send(KBD_ACK, *KBD_ID)
        elif b == 0xEE:
            self._send(0xEE)  # echo
        elif b in (0xED, 0xF3, 0xF0):
            self._kbd_param_for = b
            self._send(KBD_ACK)
        else:
            if b == 0xF4:
                self._kbd_scanning = True
            elif b in (0xF5, 0xF6):
                self._kbd_scanning = b == 0xF6  # F5 also stops scanning
                self._kbd_set = 2  # both restore the defaults, scancode set 2 among them
            self._send(KBD_ACK)

    def _send(self, *data: int) -> None:
        for b in data:
            if len(self._kbd) < KBD_BUFFER:
                self._kbd.append(b)
                self._kbd_last = b
