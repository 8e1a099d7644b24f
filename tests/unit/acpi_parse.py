"""An acpidump-style reader for tests: ACPI tables out of a memory image, written from ACPI 6.5 alone.

It shares no code or struct formats with ``evmm.acpi``, so a misreading of the spec would have to be made
twice, differently, for a test to pass on a wrong table.  It follows RSDP -> XSDT -> tables (and FADT -> DSDT),
checks signatures, lengths and checksums, decodes the FADT and MADT fields the tests need, and decodes AML
into a small tree: enough to find each Device, its _HID/_UID and its _CRS resources.

AML limitation: a NameString in a method body is read as a reference, never as a call with arguments.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


class ParseError(Exception):
    pass


def _le(data: bytes, offset: int, size: int) -> int:
    if offset + size > len(data):
        raise ParseError(f"read of {size} bytes at {offset} runs past {len(data)}")
    return int.from_bytes(data[offset : offset + size], "little")


def sums_to_zero(data: bytes) -> bool:
    return sum(data) % 256 == 0


# --- Tables ---


@dataclass(frozen=True)
class Table:
    address: int
    data: bytes  # the whole table, header included

    @property
    def signature(self) -> str:
        return self.data[0:4].decode("ascii")

    @property
    def revision(self) -> int:
        return self.data[8]

    @property
    def oem_id(self) -> bytes:
        return self.data[10:16]

    @property
    def oem_table_id(self) -> bytes:
        return self.data[16:24]

    @property
    def creator_id(self) -> bytes:
        return self.data[28:32]

    def u(self, offset: int, size: int) -> int:
        return _le(self.data, offset, size)


@dataclass(frozen=True)
class Rsdp:
    address: int
    data: bytes

    @property
    def revision(self) -> int:
        return self.data[15]

    @property
    def oem_id(self) -> bytes:
        return self.data[9:15]

    @property
    def rsdt_address(self) -> int:
        return _le(self.data, 16, 4)

    @property
    def length(self) -> int:
        return _le(self.data, 20, 4)

    @property
    def xsdt_address(self) -> int:
        return _le(self.data, 24, 8)


@dataclass
class Dump:
    rsdp: Rsdp
    xsdt: Table
    tables: dict[str, Table]  # by signature, the DSDT included


class Image:
    """A guest-physical memory image: ``blob`` at ``base``."""

    def __init__(self, blob: bytes, base: int) -> None:
        self.blob, self.base = blob, base

    def read(self, address: int, size: int) -> bytes:
        start = address - self.base
        if start < 0 or start + size > len(self.blob):
            raise ParseError(f"{size} bytes at {address:#x} lie outside the image")
        return self.blob[start : start + size]

    def table(self, address: int, signature: str) -> Table:
        length = _le(self.read(address, 8), 4, 4)
        if length < 36:
            raise ParseError(f"table at {address:#x} has length {length}, less than a header")
        table = Table(address, self.read(address, length))
        if table.signature != signature:
            raise ParseError(f"expected {signature} at {address:#x}, found {table.signature!r}")
        if not sums_to_zero(table.data):
            raise ParseError(f"{signature} checksum is wrong")
        return table


def parse(blob: bytes, base: int, rsdp_address: int) -> Dump:
    image = Image(blob, base)
    rsdp = Rsdp(rsdp_address, image.read(rsdp_address, 36))
    if rsdp.data[:8] != b"RSD PTR ":
        raise ParseError("no RSDP signature")
    if not sums_to_zero(rsdp.data[:20]):
        raise ParseError("RSDP checksum (first 20 bytes) is wrong")
    if rsdp.revision < 2 or rsdp.length != 36 or not sums_to_zero(rsdp.data):
        raise ParseError("RSDP is not a valid revision-2, 36-byte RSDP")
    xsdt = image.table(rsdp.xsdt_address, "XSDT")
    if (len(xsdt.data) - 36) % 8:
        raise ParseError("XSDT length is not a header plus 64-bit entries")
    tables: dict[str, Table] = {}
    for offset in range(36, len(xsdt.data), 8):
        address = xsdt.u(offset, 8)
        signature = image.read(address, 4).decode("ascii")
        if signature in tables:
            raise ParseError(f"two {signature} tables")
        tables[signature] = image.table(address, signature)
    fadt = tables.get("FACP")
    if fadt is not None:
        dsdt_address = fadt.u(140, 8) or fadt.u(40, 4)  # X_DSDT wins when set
        tables["DSDT"] = image.table(dsdt_address, "DSDT")
    return Dump(rsdp, xsdt, tables)


# --- FADT (ACPI 6.5 §5.2.9) ---


@dataclass(frozen=True)
class Gas:
    space_id: int
    bit_width: int
    bit_offset: int
    access_size: int
    address: int


@dataclass(frozen=True)
class Fadt:
    firmware_ctrl: int
    dsdt: int
    sci_int: int
    iapc_boot_arch: int
    flags: int
    reset_reg: Gas
    reset_value: int
    minor_version: int
    x_firmware_ctrl: int
    x_dsdt: int
    sleep_control: Gas
    sleep_status: Gas
    hypervisor_vendor: bytes
    legacy_blocks: bytes  # SMI_CMD through CENTURY (48-108): all unused in hardware-reduced ACPI
    x_legacy_blocks: bytes  # X_PM1a_EVT_BLK through X_GPE1_BLK (148-243)


def _gas(table: Table, offset: int) -> Gas:
    d = table.data
    return Gas(d[offset], d[offset + 1], d[offset + 2], d[offset + 3], table.u(offset + 4, 8))


def decode_fadt(table: Table) -> Fadt:
    if len(table.data) < 276:
        raise ParseError(f"FADT of {len(table.data)} bytes lacks the 6.x fields")
    return Fadt(
        firmware_ctrl=table.u(36, 4),
        dsdt=table.u(40, 4),
        sci_int=table.u(46, 2),
        iapc_boot_arch=table.u(109, 2),
        flags=table.u(112, 4),
        reset_reg=_gas(table, 116),
        reset_value=table.data[128],
        minor_version=table.data[131],
        x_firmware_ctrl=table.u(132, 8),
        x_dsdt=table.u(140, 8),
        sleep_control=_gas(table, 244),
        sleep_status=_gas(table, 256),
        hypervisor_vendor=table.data[268:276],
        legacy_blocks=table.data[48:109],
        x_legacy_blocks=table.data[148:244],
    )


# --- MADT (ACPI 6.5 §5.2.12) ---


@dataclass(frozen=True)
class LocalApic:
    uid: int
    apic_id: int
    flags: int


@dataclass(frozen=True)
class IoApic:
    apic_id: int
    address: int
    gsi_base: int


@dataclass(frozen=True)
class SourceOverride:
    bus: int
    source: int
    gsi: int
    flags: int


@dataclass(frozen=True)
class LocalApicNmi:
    uid: int
    flags: int
    lint: int


MadtEntry = LocalApic | IoApic | SourceOverride | LocalApicNmi


@dataclass(frozen=True)
class Madt:
    lapic_address: int
    flags: int
    entries: list[MadtEntry]


def decode_madt(table: Table) -> Madt:
    d, entries, pos = table.data, [], 44
    expected_length = {0: 8, 1: 12, 2: 10, 4: 6}
    while pos < len(d):
        kind, length = d[pos], d[pos + 1]
        if expected_length.get(kind) != length or pos + length > len(d):
            raise ParseError(f"MADT entry type {kind} with length {length} at {pos}")
        e = d[pos : pos + length]
        entry: MadtEntry
        if kind == 0:
            entry = LocalApic(e[2], e[3], _le(e, 4, 4))
        elif kind == 1:
            entry = IoApic(e[2], _le(e, 4, 4), _le(e, 8, 4))
        elif kind == 2:
            entry = SourceOverride(e[2], e[3], _le(e, 4, 4), _le(e, 8, 2))
        else:
            entry = LocalApicNmi(e[2], _le(e, 3, 2), e[5])
        entries.append(entry)
        pos += length
    return Madt(table.u(36, 4), table.u(40, 4), entries)


# --- AML (ACPI 6.5 §20) ---


def decode_pkg_length(data: bytes, pos: int) -> tuple[int, int]:
    """(value, number of bytes) of the PkgLength at ``pos``."""
    lead = data[pos]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    if lead & 0x30:
        raise ParseError(f"PkgLength lead byte {lead:#x} has reserved bits 5:4 set")
    value = lead & 0x0F
    for i in range(follow):
        value |= data[pos + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def decode_eisa_id(value: int) -> str:
    raw = value.to_bytes(4, "little")
    vendor = (raw[0] << 8) | raw[1]
    letters = "".join(chr(((vendor >> shift) & 0x1F) + 0x40) for shift in (10, 5, 0))
    return f"{letters}{raw[2]:02X}{raw[3]:02X}"


@dataclass
class Node:
    """One AML object.  ``kind`` is the ASL keyword ("Device", "Name", "Integer", ...); ``name`` its
    NameString (segments padded to four, as stored); ``value`` its payload; ``children`` what it contains."""

    kind: str
    name: str = ""
    value: int | str | bytes | None = None
    children: list[Node] = field(default_factory=list)


_LEAD_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_CHARS | set(b"0123456789")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def name_seg(self, pos: int) -> tuple[str, int]:
        seg = self.data[pos : pos + 4]
        if len(seg) != 4 or seg[0] not in _LEAD_CHARS or any(c not in _NAME_CHARS for c in seg):
            raise ParseError(f"bad NameSeg {seg!r} at {pos}")
        return seg.decode("ascii"), pos + 4

    def name_string(self, pos: int) -> tuple[str, int]:
        prefix = ""
        if self.data[pos] == ord("\\"):
            prefix, pos = "\\", pos + 1
        else:
            while self.data[pos] == ord("^"):
                prefix, pos = prefix + "^", pos + 1
        lead = self.data[pos]
        if lead == 0x00:
            return prefix, pos + 1
        if lead == 0x2E:
            count, pos = 2, pos + 1
        elif lead == 0x2F:
            count, pos = self.data[pos + 1], pos + 2
        else:
            count = 1
        segs = []
        for _ in range(count):
            seg, pos = self.name_seg(pos)
            segs.append(seg)
        return prefix + ".".join(segs), pos

    def package_end(self, pos: int) -> tuple[int, int]:
        """(end of the package whose PkgLength is at ``pos``, position after the PkgLength)."""
        length, size = decode_pkg_length(self.data, pos)
        end = pos + length
        if end > len(self.data):
            raise ParseError(f"package at {pos} of length {length} runs past the table")
        return end, pos + size

    def terms(self, pos: int, end: int) -> list[Node]:
        nodes = []
        while pos < end:
            node, pos = self.term(pos)
            nodes.append(node)
        if pos != end:
            raise ParseError(f"term list overran its package end {end} (at {pos})")
        return nodes

    def operands(self, kind: str, pos: int, count: int) -> tuple[Node, int]:
        node = Node(kind)
        for _ in range(count):
            child, pos = self.term(pos)
            node.children.append(child)
        return node, pos

    def term(self, pos: int) -> tuple[Node, int]:
        d, op = self.data, self.data[pos]
        integers = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
        if op in (0x00, 0x01):
            return Node("Integer", value=op), pos + 1
        if op == 0xFF:
            return Node("Integer", value=(1 << 64) - 1), pos + 1
        if op in integers:
            return Node("Integer", value=_le(d, pos + 1, integers[op])), pos + 1 + integers[op]
        if op == 0x0D:
            nul = d.index(0, pos + 1)
            return Node("String", value=d[pos + 1 : nul].decode("ascii")), nul + 1
        if op == 0x08:
            name, pos = self.name_string(pos + 1)
            value, pos = self.term(pos)
            return Node("Name", name, children=[value]), pos
        if op in (0x10, 0x14, 0xA0, 0xA1, 0x11, 0x12):
            return self.package_op(op, pos)
        if op == 0x5B:
            return self.ext_op(pos)
        if 0x60 <= op <= 0x67:
            return Node("Local", value=op - 0x60), pos + 1
        if 0x68 <= op <= 0x6E:
            return Node("Arg", value=op - 0x68), pos + 1
        simple = {
            0x70: ("Store", 2),
            0x86: ("Notify", 2),
            0x92: ("LNot", 1),
            0x93: ("LEqual", 2),
            0xA4: ("Return", 1),
        }
        if op in simple:
            return self.operands(simple[op][0], pos + 1, simple[op][1])
        if op in (0x7B, 0x7D):  # And, Or: two operands and a Target
            node, pos = self.operands("And" if op == 0x7B else "Or", pos + 1, 2)
            if d[pos] == 0x00:  # Target is NullName
                return node, pos + 1
            target, pos = self.term(pos)
            node.children.append(target)
            return node, pos
        if op == 0x8A:  # CreateDWordField SourceBuff ByteIndex NameString
            node, pos = self.operands("CreateDWordField", pos + 1, 2)
            node.name, pos = self.name_string(pos)
            return node, pos
        if op in _LEAD_CHARS or op in (ord("\\"), ord("^"), 0x2E, 0x2F):
            name, pos = self.name_string(pos)
            return Node("NameRef", name), pos
        raise ParseError(f"unsupported AML opcode {op:#04x} at {pos}")

    def package_op(self, op: int, pos: int) -> tuple[Node, int]:
        end, pos = self.package_end(pos + 1)
        if op == 0x10:
            name, pos = self.name_string(pos)
            return Node("Scope", name, children=self.terms(pos, end)), end
        if op == 0x14:
            name, pos = self.name_string(pos)
            return Node("Method", name, value=self.data[pos], children=self.terms(pos + 1, end)), end
        if op == 0xA0:
            predicate, pos = self.term(pos)
            return Node("If", children=[predicate, *self.terms(pos, end)]), end
        if op == 0xA1:
            return Node("Else", children=self.terms(pos, end)), end
        if op == 0x11:
            size, pos = self.term(pos)
            data = self.data[pos:end]
            if size.kind != "Integer" or size.value != len(data):
                raise ParseError(
                    f"Buffer size {size.value!r} does not match its {len(data)} initializer bytes"
                )
            return Node("Buffer", value=data), end
        count = self.data[pos]
        elements = self.terms(pos + 1, end)
        if len(elements) != count:
            raise ParseError(f"Package says {count} elements but holds {len(elements)}")
        return Node("Package", children=elements), end

    def ext_op(self, pos: int) -> tuple[Node, int]:
        op = self.data[pos + 1]
        if op == 0x80:
            name, pos = self.name_string(pos + 2)
            space = self.data[pos]
            node, pos = self.operands("OperationRegion", pos + 1, 2)
            node.name, node.value = name, space
            return node, pos
        if op not in (0x81, 0x82):
            raise ParseError(f"unsupported extended AML opcode 0x5b {op:#04x} at {pos}")
        end, pos = self.package_end(pos + 2)
        name, pos = self.name_string(pos)
        if op == 0x82:
            return Node("Device", name, children=self.terms(pos, end)), end
        flags, pos = self.data[pos], pos + 1
        units = []
        while pos < end:
            if self.data[pos] == 0x00:
                bits, size = decode_pkg_length(self.data, pos + 1)
                units.append(Node("Reserved", value=bits))
                pos += 1 + size
            else:
                unit, pos = self.name_seg(pos)
                bits, size = decode_pkg_length(self.data, pos)
                units.append(Node("FieldUnit", unit, value=bits))
                pos += size
        if pos != end:
            raise ParseError("field list overran its package")
        return Node("Field", name, value=flags, children=units), end


def decode_aml(table: Table) -> list[Node]:
    """The DSDT's definition block (everything after the 36-byte header) as a tree."""
    return _Reader(table.data).terms(36, len(table.data))


def _join(scope: str, name: str) -> str:
    if name.startswith("\\"):
        return name
    return scope + ("" if scope.endswith("\\") else ".") + name


def walk(nodes: list[Node], scope: str = "\\") -> Iterator[tuple[str, Node]]:
    """Every named object with its absolute path (e.g. ``\\_SB_.COM1``), depth first.

    A Field names no object itself; its FieldUnits are the named objects, in the enclosing scope."""
    for node in nodes:
        if node.kind == "Field":
            yield from ((_join(scope, u.name), u) for u in node.children if u.kind == "FieldUnit")
        elif node.kind in ("Scope", "Device", "Name", "Method", "OperationRegion"):
            path = _join(scope, node.name)
            yield path, node
            if node.kind in ("Scope", "Device"):
                yield from walk(node.children, path)


def devices(nodes: list[Node]) -> dict[str, Node]:
    return {path: node for path, node in walk(nodes) if node.kind == "Device"}


def named(device: Node, name: str) -> Node | None:
    """The value of ``Name(name, ...)`` directly inside ``device``."""
    for child in device.children:
        if child.kind == "Name" and child.name == name:
            return child.children[0]
    return None


def hardware_id(device: Node) -> str:
    hid = named(device, "_HID")
    if hid is None:
        raise ParseError(f"device {device.name} has no _HID")
    if hid.kind == "Integer" and isinstance(hid.value, int):
        return decode_eisa_id(hid.value)
    if hid.kind == "String" and isinstance(hid.value, str):
        return hid.value
    raise ParseError(f"device {device.name} has a _HID of kind {hid.kind}")


# --- Resource descriptors (ACPI 6.5 §6.4) ---


@dataclass(frozen=True)
class IoPort:
    decode16: bool
    minimum: int
    maximum: int
    alignment: int
    length: int


@dataclass(frozen=True)
class Irq:
    irqs: tuple[int, ...]
    information: int | None  # None for the 2-byte form (IRQNoFlags)


@dataclass(frozen=True)
class FixedMemory32:
    writable: bool
    base: int
    length: int


@dataclass(frozen=True)
class ExtInterrupt:
    consumer: bool
    edge: bool
    active_low: bool
    shared: bool
    wake_capable: bool
    interrupts: tuple[int, ...]


@dataclass(frozen=True)
class AddressRange:
    """A QWord, DWord or Word Address Space Descriptor (ACPI 6.5 §6.4.3.5)."""

    width: int  # 64, 32 or 16
    kind: int  # 0 memory, 1 I/O, 2 bus number
    general_flags: int
    type_flags: int
    granularity: int
    minimum: int
    maximum: int
    translation: int
    length: int


Resource = IoPort | Irq | FixedMemory32 | ExtInterrupt | AddressRange

# Large item name -> width of the address space descriptor's five numeric fields.
_ADDRESS_ITEMS = {0x0A: 8, 0x07: 4, 0x08: 2}


def decode_resources(data: bytes) -> list[Resource]:
    """A resource template; it must end with an End tag whose checksum is zero or makes the sum zero."""
    out: list[Resource] = []
    pos = 0
    while pos < len(data):
        tag = data[pos]
        if tag & 0x80:
            item, length = tag & 0x7F, _le(data, pos + 1, 2)
            body, pos = data[pos + 3 : pos + 3 + length], pos + 3 + length
            if item == 0x06 and length == 9:
                out.append(FixedMemory32(bool(body[0] & 1), _le(body, 1, 4), _le(body, 5, 4)))
            elif item == 0x09 and length >= 6 and length == 2 + 4 * body[1]:
                f = body[0]
                ints = tuple(_le(body, 2 + 4 * i, 4) for i in range(body[1]))
                out.append(
                    ExtInterrupt(bool(f & 1), bool(f & 2), bool(f & 4), bool(f & 8), bool(f & 16), ints)
                )
            elif item in _ADDRESS_ITEMS and length == 3 + 5 * _ADDRESS_ITEMS[item]:
                n = _ADDRESS_ITEMS[item]
                fields = [_le(body, 3 + i * n, n) for i in range(5)]
                out.append(AddressRange(8 * n, body[0], body[1], body[2], *fields))
            else:
                raise ParseError(f"unsupported large resource {item:#x} of length {length}")
            continue
        item, length = (tag >> 3) & 0x0F, tag & 0x07
        body, pos = data[pos + 1 : pos + 1 + length], pos + 1 + length
        if item == 0x0F and length == 1:
            if pos != len(data):
                raise ParseError("bytes after the End tag")
            if body[0] != 0 and not sums_to_zero(data):
                raise ParseError("resource template checksum is wrong")
            return out
        if item == 0x04 and length in (2, 3):
            mask = _le(body, 0, 2)
            info = body[2] if length == 3 else None
            out.append(Irq(tuple(i for i in range(16) if mask >> i & 1), info))
        elif item == 0x08 and length == 7:
            out.append(IoPort(bool(body[0] & 1), _le(body, 1, 2), _le(body, 3, 2), body[5], body[6]))
        else:
            raise ParseError(f"unsupported small resource {item:#x} of length {length}")
    raise ParseError("resource template has no End tag")


def current_resources(device: Node) -> list[Resource]:
    crs = named(device, "_CRS")
    if crs is None or crs.kind != "Buffer" or not isinstance(crs.value, bytes):
        raise ParseError(f"device {device.name} has no _CRS buffer")
    return decode_resources(crs.value)
