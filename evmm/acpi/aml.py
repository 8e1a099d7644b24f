"""A small AML builder: the part of ACPI Machine Language that the evmm DSDT needs (ACPI 6.5 §20).

Each AML object is a frozen dataclass with ``to_aml() -> bytes``; objects nest, so a DSDT is a tuple of
terms joined by ``term_list``.  Resource descriptors (ACPI 6.5 §6.4) are not AML terms but bytes inside a
Buffer, so they have ``to_bytes()`` instead and only ``ResourceTemplate`` turns them into an AML object:
the type checker then refuses a descriptor placed straight into a Device body.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Sequence
from typing import ClassVar, Protocol, TypeAlias

from evmm.record import record


class AmlObject(Protocol):
    def to_aml(self) -> bytes: ...


# Where the grammar takes a TermArg or DataObject, a plain int is accepted and encoded as an Integer.
Operand: TypeAlias = "AmlObject | int"

# Opcodes (ACPI 6.5 §20.2.5 and the opcode table in §20.3).
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
OP_REGION_OP = 0x80  # after EXT_OP_PREFIX
FIELD_OP = 0x81  # after EXT_OP_PREFIX
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
AND_OP = 0x7B
OR_OP = 0x7D
NOTIFY_OP = 0x86
CREATE_DWORD_FIELD_OP = 0x8A
LNOT_OP = 0x92
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
ONES_OP = 0xFF
NULL_NAME = 0x00

# A PkgLength of n bytes holds values up to these (§20.2.4): 6 bits, then 4 + 8 * (n - 1) bits.
_PKG_LENGTH_LIMITS = (0x3F, 0xFFF, 0xFFFFF, 0xFFFFFFF)
MAX_PKG_LENGTH = _PKG_LENGTH_LIMITS[-1]


def encode_pkg_length(value: int) -> bytes:
    """Encode ``value`` as a PkgLength in the fewest bytes (ACPI 6.5 §20.2.4).

    One byte holds 0..63 in bits 5:0.  Otherwise bits 7:6 of the lead byte count the 1-3 bytes that
    follow, its bits 3:0 hold the low nibble and the following bytes the rest, least significant first.
    For a package the value counts the PkgLength bytes themselves (see ``pkg_length``); inside a
    FieldList it is a plain bit width.
    """
    if not 0 <= value <= MAX_PKG_LENGTH:
        raise ValueError(f"PkgLength {value} is outside 0..{MAX_PKG_LENGTH}")
    if value <= _PKG_LENGTH_LIMITS[0]:
        return bytes([value])
    follow = next(n for n, limit in enumerate(_PKG_LENGTH_LIMITS) if value <= limit)
    return bytes([(follow << 6) | (value & 0x0F)]) + (value >> 4).to_bytes(follow, "little")


def pkg_length(body_len: int) -> bytes:
    """The PkgLength that precedes a body of ``body_len`` bytes: it counts its own bytes too."""
    for size, limit in enumerate(_PKG_LENGTH_LIMITS, start=1):
        if body_len + size <= limit:
            return encode_pkg_length(body_len + size)
    raise ValueError(f"an AML package body of {body_len} bytes is too long for a PkgLength")


def _package(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


def name_seg(seg: str) -> bytes:
    """A NameSeg: a lead character [A-Z_], up to three more [A-Z0-9_], padded to four with ``_`` (§20.2.2)."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"{seg!r} is not an AML NameSeg (1-4 of A-Z, 0-9, _; not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString (§20.2.2): ``\`` or ``^``... prefix, then segments joined by ``.``.

    Two segments take DualNamePrefix, three or more MultiNamePrefix and a count, none NullName.
    """
    prefix_len = 1 if path.startswith("\\") else len(path) - len(path.lstrip("^"))
    prefix, rest = path[:prefix_len].encode("ascii"), path[prefix_len:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def encode(obj: Operand) -> bytes:
    """Encode an AML object, or an int as an Integer."""
    return Integer(obj).to_aml() if isinstance(obj, int) else obj.to_aml()


def term_list(terms: Sequence[AmlObject]) -> bytes:
    return b"".join(t.to_aml() for t in terms)


# --- Data objects (§20.2.3) ---

_INTEGER_FORMS = ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I"), (QWORD_PREFIX, "<Q"))


@record(frozen=True)
class Integer:
    """An integer in its shortest form: Zero, One, Ones, or a Byte/Word/DWord/QWord constant.

    Ones is all 64 bits set because the evmm DSDT has revision 2 (64-bit integers, ACPI 6.5 §5.2.11.1).
    """

    value: int

    def to_aml(self) -> bytes:
        v = self.value
        if not 0 <= v < 1 << 64:
            raise ValueError(f"AML integer {v} is outside 0..2**64-1")
        if v in (0, 1):
            return bytes([ZERO_OP if v == 0 else ONE_OP])
        if v == (1 << 64) - 1:
            return bytes([ONES_OP])
        for prefix, fmt in _INTEGER_FORMS:
            if v < 1 << (8 * struct.calcsize(fmt)):
                return bytes([prefix]) + struct.pack(fmt, v)
        raise AssertionError("unreachable: a QWordConst holds any 64-bit value")


ZERO = Integer(0)
ONE = Integer(1)
ONES = Integer((1 << 64) - 1)

_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


def eisa_id(pnp_id: str) -> Integer:
    """ASL's EISAID(): three letters in 5 bits each (A=1) and four hex digits, stored big-endian (ACPI 6.5 §19.6, EISAID).

    ``eisa_id("PNP0501").value == 0x0105D041``: the bytes 41 D0 05 01 read as a little-endian DWord.
    """
    if not _EISA_ID.fullmatch(pnp_id):
        raise ValueError(f"{pnp_id!r} is not an EISA id (three letters A-Z, then four hex digits)")
    vendor = 0
    for ch in pnp_id[:3]:
        vendor = (vendor << 5) | (ord(ch) - ord("@"))
    compressed = (vendor << 16) | int(pnp_id[3:], 16)
    return Integer(int.from_bytes(compressed.to_bytes(4, "big"), "little"))


@record(frozen=True)
class String:
    """A String: ASCII characters 0x01-0x7F, NUL-terminated."""

    text: str

    def to_aml(self) -> bytes:
        if any(not 0x01 <= ord(c) <= 0x7F for c in self.text):
            raise ValueError(f"AML string {self.text!r} must be ASCII without NUL")
        return bytes([STRING_PREFIX]) + self.text.encode("ascii") + b"\0"


@record(frozen=True)
class Buffer:
    """A Buffer whose size is its initializer's length."""

    data: bytes

    def to_aml(self) -> bytes:
        return bytes([BUFFER_OP]) + _package(Integer(len(self.data)).to_aml() + self.data)


@record(frozen=True)
class Package:
    elements: tuple[Operand, ...]

    def to_aml(self) -> bytes:
        if len(self.elements) > 255:
            raise ValueError("an AML Package holds at most 255 elements (use VarPackage)")
        body = bytes([len(self.elements)]) + b"".join(encode(e) for e in self.elements)
        return bytes([PACKAGE_OP]) + _package(body)


@record(frozen=True)
class NameRef:
    r"""A reference to a named object by path, e.g. ``NameRef("\\_SB.PWRB")``."""

    path: str

    def to_aml(self) -> bytes:
        return name_string(self.path)


@record(frozen=True)
class Local:
    index: int

    def to_aml(self) -> bytes:
        if not 0 <= self.index <= 7:
            raise ValueError(f"Local{self.index} does not exist (Local0-Local7)")
        return bytes([LOCAL0_OP + self.index])


@record(frozen=True)
class Arg:
    index: int

    def to_aml(self) -> bytes:
        if not 0 <= self.index <= 6:
            raise ValueError(f"Arg{self.index} does not exist (Arg0-Arg6)")
        return bytes([ARG0_OP + self.index])


# --- Named objects and namespace modifiers (§20.2.5.1, §20.2.5.2) ---


@record(frozen=True)
class Name:
    name: str
    value: Operand

    def to_aml(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.name) + encode(self.value)


@record(frozen=True)
class Scope:
    path: str
    terms: tuple[AmlObject, ...]

    def to_aml(self) -> bytes:
        return bytes([SCOPE_OP]) + _package(name_string(self.path) + term_list(self.terms))


@record(frozen=True)
class Device:
    name: str
    terms: tuple[AmlObject, ...]

    def to_aml(self) -> bytes:
        body = name_string(self.name) + term_list(self.terms)
        return bytes([EXT_OP_PREFIX, DEVICE_OP]) + _package(body)


@record(frozen=True)
class Method:
    """MethodFlags: bits 2:0 ArgCount, bit 3 SerializeFlag, bits 7:4 SyncLevel (§20.2.5.2)."""

    name: str
    arg_count: int
    body: tuple[AmlObject, ...]
    serialized: bool = False
    sync_level: int = 0

    def to_aml(self) -> bytes:
        if not 0 <= self.arg_count <= 7 or not 0 <= self.sync_level <= 15:
            raise ValueError(f"method {self.name}: 0-7 arguments and sync level 0-15")
        flags = self.arg_count | (int(self.serialized) << 3) | (self.sync_level << 4)
        body = name_string(self.name) + bytes([flags]) + term_list(self.body)
        return bytes([METHOD_OP]) + _package(body)


class RegionSpace(enum.IntEnum):
    """OperationRegion space ids (ACPI 6.5 §19.6, OperationRegion; §5.2.3.2)."""

    SYSTEM_MEMORY = 0x00
    SYSTEM_IO = 0x01


@record(frozen=True)
class OperationRegion:
    name: str
    space: RegionSpace
    offset: Operand
    length: Operand

    def to_aml(self) -> bytes:
        return (
            bytes([EXT_OP_PREFIX, OP_REGION_OP])
            + name_string(self.name)
            + bytes([self.space])
            + encode(self.offset)
            + encode(self.length)
        )


class AccessType(enum.IntEnum):
    """FieldFlags bits 3:0 (§20.2.5.2)."""

    ANY = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4
    BUFFER = 5


class LockRule(enum.IntEnum):
    """FieldFlags bit 4."""

    NO_LOCK = 0
    LOCK = 1


class UpdateRule(enum.IntEnum):
    """FieldFlags bits 6:5."""

    PRESERVE = 0
    WRITE_AS_ONES = 1
    WRITE_AS_ZEROS = 2


@record(frozen=True)
class FieldUnit:
    """A NamedField: NameSeg, then its width in bits encoded as a PkgLength (not counting itself)."""

    name: str
    bits: int

    def to_aml(self) -> bytes:
        return name_seg(self.name) + encode_pkg_length(self.bits)


@record(frozen=True)
class ReservedField:
    """ASL ``Offset()``/unnamed bits: 0x00, then the number of bits to skip."""

    bits: int

    def to_aml(self) -> bytes:
        return bytes([0x00]) + encode_pkg_length(self.bits)


@record(frozen=True)
class Field:
    region: str
    units: tuple[FieldUnit | ReservedField, ...]
    access: AccessType = AccessType.ANY
    lock: LockRule = LockRule.NO_LOCK
    update: UpdateRule = UpdateRule.PRESERVE

    def to_aml(self) -> bytes:
        flags = self.access | (self.lock << 4) | (self.update << 5)
        body = name_string(self.region) + bytes([flags]) + term_list(self.units)
        return bytes([EXT_OP_PREFIX, FIELD_OP]) + _package(body)


# --- Statements and expressions (§20.2.5.3, §20.2.5.4) ---


@record(frozen=True)
class If:
    """If, and its Else when ``orelse`` is given (an Else must follow its If directly: §20.2.5.3)."""

    predicate: Operand
    body: tuple[AmlObject, ...]
    orelse: tuple[AmlObject, ...] | None = None

    def to_aml(self) -> bytes:
        aml = bytes([IF_OP]) + _package(encode(self.predicate) + term_list(self.body))
        if self.orelse is not None:
            aml += bytes([ELSE_OP]) + _package(term_list(self.orelse))
        return aml


@record(frozen=True)
class LEqual:
    left: Operand
    right: Operand

    def to_aml(self) -> bytes:
        return bytes([LEQUAL_OP]) + encode(self.left) + encode(self.right)


@record(frozen=True)
class _Bitwise:
    """A bitwise operator (Operand Operand Target); with no target the result is only returned (Target is
    NullName)."""

    OPCODE: ClassVar[int]
    left: Operand
    right: Operand
    target: AmlObject | None = None

    def to_aml(self) -> bytes:
        target = self.target.to_aml() if self.target else bytes([NULL_NAME])
        return bytes([self.OPCODE]) + encode(self.left) + encode(self.right) + target


@record(frozen=True)
class And(_Bitwise):
    OPCODE = AND_OP


@record(frozen=True)
class Or(_Bitwise):
    OPCODE = OR_OP


@record(frozen=True)
class LNot:
    operand: Operand

    def to_aml(self) -> bytes:
        return bytes([LNOT_OP]) + encode(self.operand)


@record(frozen=True)
class CreateDWordField:
    """Name the dword at byte ``index`` of buffer ``source`` (§19.6.18), as _OSC reads its capabilities."""

    source: AmlObject
    index: Operand
    name: str

    def to_aml(self) -> bytes:
        return (
            bytes([CREATE_DWORD_FIELD_OP])
            + self.source.to_aml()
            + encode(self.index)
            + name_string(self.name)
        )


@record(frozen=True)
class Store:
    source: Operand
    target: AmlObject

    def to_aml(self) -> bytes:
        return bytes([STORE_OP]) + encode(self.source) + self.target.to_aml()


@record(frozen=True)
class Notify:
    target: AmlObject
    value: Operand

    def to_aml(self) -> bytes:
        return bytes([NOTIFY_OP]) + self.target.to_aml() + encode(self.value)


@record(frozen=True)
class Return:
    value: Operand

    def to_aml(self) -> bytes:
        return bytes([RETURN_OP]) + encode(self.value)


# --- Resource descriptors (ACPI 6.5 §6.4) ---


class ResourceDescriptor(Protocol):
    def to_bytes(self) -> bytes: ...


def _small(item: int, data: bytes) -> bytes:
    """Small resource: tag byte 0 b6..b3 = item name, b2..b0 = length of the data that follows (§6.4.2)."""
    return bytes([(item << 3) | len(data)]) + data


def _large(item: int, data: bytes) -> bytes:
    """Large resource: tag byte 1 b6..b0 = item name, then a 16-bit data length (§6.4.3)."""
    return bytes([0x80 | item]) + struct.pack("<H", len(data)) + data


class Trigger(enum.IntEnum):
    LEVEL = 0
    EDGE = 1


class Polarity(enum.IntEnum):
    ACTIVE_HIGH = 0
    ACTIVE_LOW = 1


class Sharing(enum.IntEnum):
    EXCLUSIVE = 0
    SHARED = 1


@record(frozen=True)
class IRQNoFlags:
    """IRQ descriptor without its information byte (§6.4.2.1): edge, active high, exclusive by definition."""

    irqs: tuple[int, ...]

    def to_bytes(self) -> bytes:
        if not self.irqs or any(not 0 <= irq <= 15 for irq in self.irqs):
            raise ValueError(f"IRQNoFlags takes ISA IRQs 0-15, not {self.irqs}")
        mask = sum(1 << irq for irq in set(self.irqs))
        return _small(0x04, struct.pack("<H", mask))


@record(frozen=True)
class IO:
    """I/O port descriptor (§6.4.2.5): information (bit 0 = 16-bit decode), min, max, alignment, length."""

    minimum: int
    maximum: int
    alignment: int
    length: int
    decode16: bool = True

    def to_bytes(self) -> bytes:
        if not (0 <= self.minimum <= self.maximum <= 0xFFFF and 0 <= self.alignment <= 0xFF):
            raise ValueError(f"bad I/O port range {self.minimum:#x}-{self.maximum:#x}")
        if not 0 <= self.length <= 0xFF:
            raise ValueError(f"I/O port range length {self.length} exceeds 255")
        data = struct.pack(
            "<BHHBB", int(self.decode16), self.minimum, self.maximum, self.alignment, self.length
        )
        return _small(0x08, data)


@record(frozen=True)
class Memory32Fixed:
    """32-bit fixed memory range (§6.4.3.4): information (bit 0 = read-write), base, length."""

    base: int
    length: int
    writable: bool = True

    def to_bytes(self) -> bytes:
        if not (self.base >= 0 and self.length > 0 and self.base + self.length <= 1 << 32):
            raise ValueError(f"memory range {self.base:#x}+{self.length:#x} is not below 4 GiB")
        return _large(0x06, struct.pack("<BII", int(self.writable), self.base, self.length))


@record(frozen=True)
class ExtendedInterrupt:
    """Extended Interrupt descriptor (§6.4.3.6), ASL ``Interrupt()``, without a resource source.

    Flags: bit 0 consumer, bit 1 edge, bit 2 active low, bit 3 shared, bit 4 wake capable.
    """

    interrupts: tuple[int, ...]
    consumer: bool = True
    trigger: Trigger = Trigger.EDGE
    polarity: Polarity = Polarity.ACTIVE_HIGH
    sharing: Sharing = Sharing.EXCLUSIVE
    wake_capable: bool = False

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.interrupts) <= 255 or any(not 0 <= i < 1 << 32 for i in self.interrupts):
            raise ValueError(f"Interrupt() takes 1-255 32-bit interrupt numbers, not {self.interrupts}")
        flags = (
            int(self.consumer)
            | (self.trigger << 1)
            | (self.polarity << 2)
            | (self.sharing << 3)
            | (int(self.wake_capable) << 4)
        )
        data = bytes([flags, len(self.interrupts)]) + struct.pack(
            f"<{len(self.interrupts)}I", *self.interrupts
        )
        return _large(0x09, data)


class AddressSpaceType(enum.IntEnum):
    """Resource Type of an Address Space Descriptor (§6.4.3.5.1, Table 6.48)."""

    MEMORY = 0
    IO = 1
    BUS_NUMBER = 2


class Cacheability(enum.IntEnum):
    """_MEM, bits 2:1 of a memory range's type-specific flags (§6.4.3.5.1, Table 6.50)."""

    NON_CACHEABLE = 0
    CACHEABLE = 1
    WRITE_COMBINING = 2
    PREFETCHABLE = 3


# (item name, struct format of one field) of the QWord, DWord and Word Address Space Descriptors (§6.4.3.5).
_ADDRESS_FORMS = {64: (0x0A, "Q"), 32: (0x07, "I"), 16: (0x08, "H")}
IO_ENTIRE_RANGE = 0x3  # _RNG: both ISA and non-ISA ranges (Table 6.51)


@record(frozen=True)
class AddressSpace:
    """A QWord/DWord/Word Address Space Descriptor, as a bridge produces it (ASL ``QWordMemory``,
    ``DWordMemory``, ``WordIO``, ``WordBusNumber`` with ResourceProducer, PosDecode, MinFixed, MaxFixed).

    General flags (§6.4.3.5.1): bit 0 clear for a producer, bit 1 clear for positive decode, bits 2 and 3
    set for fixed minimum and maximum.  ``type_flags`` are the memory or I/O specific flags.
    """

    kind: AddressSpaceType
    width: int  # 16, 32 or 64
    minimum: int
    maximum: int
    type_flags: int = 0
    translation: int = 0

    def to_bytes(self) -> bytes:
        if self.width not in _ADDRESS_FORMS:
            raise ValueError(f"address space descriptors are 16, 32 or 64 bits wide, not {self.width}")
        if not 0 <= self.minimum <= self.maximum < 1 << self.width:
            raise ValueError(f"bad {self.width}-bit range {self.minimum:#x}-{self.maximum:#x}")
        item, field = _ADDRESS_FORMS[self.width]
        general = (1 << 2) | (1 << 3)
        length = self.maximum - self.minimum + 1
        data = struct.pack(
            f"<BBB5{field}",
            self.kind,
            general,
            self.type_flags,
            0,
            self.minimum,
            self.maximum,
            self.translation,
            length,
        )
        return _large(item, data)


def word_bus_number(first: int, last: int) -> AddressSpace:
    return AddressSpace(AddressSpaceType.BUS_NUMBER, 16, first, last)


def word_io(minimum: int, maximum: int) -> AddressSpace:
    return AddressSpace(AddressSpaceType.IO, 16, minimum, maximum, type_flags=IO_ENTIRE_RANGE)


def memory_window(minimum: int, maximum: int, width: int, cacheable: Cacheability) -> AddressSpace:
    """A read-write memory window (``DWordMemory`` or ``QWordMemory``): _RW in bit 0, _MEM in bits 2:1."""
    return AddressSpace(AddressSpaceType.MEMORY, width, minimum, maximum, type_flags=1 | cacheable << 1)


# End tag (§6.4.2.9); a zero checksum means "treat the template as if its checksum were right".
END_TAG = _small(0x0F, b"\0")


@record(frozen=True)
class ResourceTemplate:
    """ASL ``ResourceTemplate()``: the descriptors and an End tag, as a Buffer."""

    descriptors: tuple[ResourceDescriptor, ...]

    def to_aml(self) -> bytes:
        return Buffer(b"".join(d.to_bytes() for d in self.descriptors) + END_TAG).to_aml()
