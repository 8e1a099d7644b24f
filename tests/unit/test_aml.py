"""AML encodings, byte for byte against values worked out from ACPI 6.5 §20 and §6.4, and round trips
through the independent parser in ``acpi_parse``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evmm.acpi.aml import (
    END_TAG,
    IO,
    MAX_PKG_LENGTH,
    ONES,
    AccessType,
    And,
    Arg,
    Buffer,
    Device,
    ExtendedInterrupt,
    Field,
    FieldUnit,
    If,
    Integer,
    IRQNoFlags,
    LEqual,
    Local,
    LockRule,
    Memory32Fixed,
    Method,
    Name,
    NameRef,
    Notify,
    OperationRegion,
    Package,
    Polarity,
    RegionSpace,
    ReservedField,
    ResourceTemplate,
    Return,
    Scope,
    Sharing,
    Store,
    String,
    Trigger,
    UpdateRule,
    eisa_id,
    encode_pkg_length,
    name_seg,
    name_string,
    pkg_length,
)
from tests.unit import acpi_parse
from tests.unit.acpi_parse import ExtInterrupt, FixedMemory32, IoPort, Irq

pytestmark = pytest.mark.unit


def _parse_terms(aml: bytes) -> list[acpi_parse.Node]:
    """Parse a bare term list by giving it a blank 36-byte table header."""
    return acpi_parse.decode_aml(acpi_parse.Table(0, bytes(36) + aml))


# --- PkgLength (§20.2.4) ---


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),  # the largest one-byte PkgLength: 6 bits
        (64, b"\x40\x04"),  # two bytes: lead 01 00 0000, then 64 >> 4 = 4
        (0x123, b"\x43\x12"),
        (4095, b"\x4f\xff"),  # the largest two-byte PkgLength: 4 + 8 bits
        (4096, b"\x80\x00\x01"),  # three bytes: 4096 >> 4 = 0x100, little-endian
        ((1 << 20) - 1, b"\x8f\xff\xff"),
        (1 << 20, b"\xc0\x00\x00\x01"),
        (MAX_PKG_LENGTH, b"\xcf\xff\xff\xff"),
    ],
)
def test_pkg_length_boundaries(value: int, encoded: bytes) -> None:
    assert encode_pkg_length(value) == encoded


@pytest.mark.parametrize("value", [-1, MAX_PKG_LENGTH + 1])
def test_pkg_length_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="PkgLength"):
        encode_pkg_length(value)


@pytest.mark.parametrize(
    ("body_len", "encoded"),
    [
        (62, b"\x3f"),  # 62 + 1 = 63 still fits one byte
        (63, b"\x41\x04"),  # 63 + 1 = 64 does not: two bytes, and 63 + 2 = 65 = 0x41
        (4093, b"\x4f\xff"),  # 4093 + 2 = 4095 fits two bytes
        (4094, b"\x81\x00\x01"),  # 4094 + 2 = 4096 does not: 4094 + 3 = 4097 = 0x1001
    ],
)
def test_package_length_counts_itself(body_len: int, encoded: bytes) -> None:
    assert pkg_length(body_len) == encoded


@given(st.integers(min_value=0, max_value=MAX_PKG_LENGTH))
def test_pkg_length_round_trip_and_minimal(value: int) -> None:
    encoded = encode_pkg_length(value)
    assert acpi_parse.decode_pkg_length(encoded, 0) == (value, len(encoded))
    assert len(encoded) == 1 + (value >= 64) + (value >= 1 << 12) + (value >= 1 << 20)


@given(st.integers(min_value=0, max_value=MAX_PKG_LENGTH - 4))
def test_package_length_covers_body_and_itself(body_len: int) -> None:
    prefix = pkg_length(body_len)
    value, size = acpi_parse.decode_pkg_length(prefix, 0)
    assert size == len(prefix)
    assert value == body_len + len(prefix)
    if len(prefix) > 1:  # a shorter prefix could not have held body + itself
        assert body_len + len(prefix) - 1 > (0x3F, 0xFFF, 0xFFFFF)[len(prefix) - 2]


def test_deep_nesting_uses_long_pkg_lengths() -> None:
    """Bodies past 63 and 4095 bytes take 2- and 3-byte PkgLengths and still parse back."""
    names = tuple(Name(f"N{i:03X}", String("x" * 40)) for i in range(120))  # ~5.6 KiB
    aml = Scope("\\_SB", (Device("BIG", names[:1]), Device("HUGE", names)))
    (scope,) = _parse_terms(aml.to_aml())
    big, huge = scope.children
    assert aml.to_aml()[1] >> 6 == 2  # the Scope's PkgLength has three bytes
    assert (big.name, len(big.children)) == ("BIG_", 1)
    assert (huge.name, len(huge.children)) == ("HUGE", 120)
    assert huge.children[119].children[0].value == "x" * 40


# --- Names (§20.2.2) ---


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_S5", b"_S5_"),
        ("A", b"A___"),
        ("\\", b"\\\x00"),  # root alone: RootChar then NullName
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.PWRB", b"\\\x2e_SB_PWRB"),  # DualNamePrefix
        ("\\_SB.PCI0.S08", b"\\\x2f\x03_SB_PCI0S08_"),  # MultiNamePrefix and a segment count
        ("^^ESEL", b"^^ESEL"),
        ("^", b"^\x00"),
        ("GED.ESEL", b"\x2eGED_ESEL"),
    ],
)
def test_name_string_forms(path: str, encoded: bytes) -> None:
    assert name_string(path) == encoded


@pytest.mark.parametrize("seg", ["", "1ABC", "ABCDE", "ab", "A-B", "É"])
def test_bad_name_segments_are_refused(seg: str) -> None:
    with pytest.raises(ValueError, match="NameSeg"):
        name_seg(seg)


def test_empty_segment_in_path_is_refused() -> None:
    with pytest.raises(ValueError, match="NameSeg"):
        name_string("\\_SB..X")


_SEG = st.from_regex(r"[A-Z_][A-Z0-9_]{0,3}", fullmatch=True)


@given(st.sampled_from(["", "\\", "^", "^^"]), st.lists(_SEG, min_size=1, max_size=6))
def test_name_string_round_trip(prefix: str, segs: list[str]) -> None:
    path = prefix + ".".join(segs)
    (node,) = _parse_terms(NameRef(path).to_aml())
    assert node.kind == "NameRef"
    assert node.name == prefix + ".".join(s.ljust(4, "_") for s in segs)


# --- Data objects (§20.2.3) ---


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),  # ZeroOp
        (1, b"\x01"),  # OneOp
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFEB00003, b"\x0c\x03\x00\xb0\xfe"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        ((1 << 64) - 2, b"\x0e\xfe\xff\xff\xff\xff\xff\xff\xff"),
        ((1 << 64) - 1, b"\xff"),  # OnesOp: all 64 bits in a revision-2 definition block
    ],
)
def test_integer_minimal_encoding(value: int, encoded: bytes) -> None:
    assert Integer(value).to_aml() == encoded


def test_ones_is_ones_op() -> None:
    assert ONES.to_aml() == b"\xff"


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integer_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="AML integer"):
        Integer(value).to_aml()


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_integer_round_trip(value: int) -> None:
    (node,) = _parse_terms(Integer(value).to_aml())
    assert (node.kind, node.value) == ("Integer", value)


def test_eisa_id_pnp0501() -> None:
    # P=0x10, N=0x0E, P=0x10 in 5 bits each -> 0x41D0; product 0x0501; stored 41 D0 05 01.
    assert eisa_id("PNP0501").value == 0x0105D041
    assert eisa_id("PNP0501").to_aml() == b"\x0c\x41\xd0\x05\x01"


@pytest.mark.parametrize(("pnp", "value"), [("PNP0303", 0x0303D041), ("PNP0B00", 0x000BD041)])
def test_eisa_id_others(pnp: str, value: int) -> None:
    assert eisa_id(pnp).value == value


@given(st.from_regex(r"[A-Z]{3}[0-9A-F]{4}", fullmatch=True))
def test_eisa_id_round_trip(pnp: str) -> None:
    assert acpi_parse.decode_eisa_id(eisa_id(pnp).value) == pnp


@pytest.mark.parametrize("bad", ["pnp0501", "PNP050", "PNP05011", "PN10501", "PNP050G"])
def test_eisa_id_refuses_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="EISA id"):
        eisa_id(bad)


def test_string() -> None:
    assert String("LNRO0005").to_aml() == b"\x0dLNRO0005\x00"
    with pytest.raises(ValueError, match="ASCII"):
        String("caf\u00e9").to_aml()
    with pytest.raises(ValueError, match="ASCII"):
        String("a\0b").to_aml()


def test_buffer() -> None:
    # BufferOp, PkgLength 5 (itself, BytePrefix 2, two bytes), BufferSize 2, the bytes.
    assert Buffer(b"\x01\x02").to_aml() == b"\x11\x05\x0a\x02\x01\x02"
    assert Buffer(b"").to_aml() == b"\x11\x02\x00"


def test_package_and_name() -> None:
    # PackageOp, PkgLength 5, NumElements 2, BytePrefix 5, ZeroOp.
    package = Package((5, 0))
    assert package.to_aml() == b"\x12\x05\x02\x0a\x05\x00"
    assert Name("_S5", package).to_aml() == b"\x08_S5_" + package.to_aml()
    (node,) = _parse_terms(Name("_S5", Package((5, 0, String("x")))).to_aml())
    assert [c.value for c in node.children[0].children] == [5, 0, "x"]


# --- Named objects, fields and statements (§20.2.5) ---


def test_scope_device_method() -> None:
    assert Scope("\\_SB", ()).to_aml() == b"\x10\x06\\_SB_"
    assert Device("COM1", ()).to_aml() == b"\x5b\x82\x05COM1"
    # MethodFlags: 1 argument | Serialized (bit 3) = 0x09.
    assert Method("_EVT", 1, (), serialized=True).to_aml() == b"\x14\x06_EVT\x09"
    # PkgLength 9: itself, the name (4), flags (1), Return 0x0F (3).
    assert Method("_STA", 0, (Return(0x0F),)).to_aml() == b"\x14\x09_STA\x00\xa4\x0a\x0f"
    assert Method("M", 7, (), sync_level=15).to_aml()[-1] == 0xF7
    with pytest.raises(ValueError, match="0-7 arguments"):
        Method("M", 8, ()).to_aml()


def test_operation_region_and_field() -> None:
    region = OperationRegion("EREG", RegionSpace.SYSTEM_MEMORY, 0xFEB00003, 1)
    assert region.to_aml() == b"\x5b\x80EREG\x00\x0c\x03\x00\xb0\xfe\x01"
    field = Field("EREG", (FieldUnit("ESEL", 8),), AccessType.BYTE, LockRule.NO_LOCK, UpdateRule.PRESERVE)
    # FieldOp, PkgLength 11, region name, flags ByteAcc, "ESEL" and its width 8 (a PkgLength, not counting itself).
    assert field.to_aml() == b"\x5b\x81\x0bEREG\x01ESEL\x08"
    flags = Field("R", (), AccessType.DWORD, LockRule.LOCK, UpdateRule.WRITE_AS_ZEROS).to_aml()[7]
    assert flags == 0x03 | 0x10 | 0x40
    wide = Field("R", (ReservedField(8), FieldUnit("WIDE", 64)), AccessType.ANY)
    (node,) = _parse_terms(wide.to_aml())
    assert [(u.kind, u.name, u.value) for u in node.children] == [
        ("Reserved", "", 8),
        ("FieldUnit", "WIDE", 64),
    ]


def test_statements() -> None:
    assert Store(NameRef("ESEL"), Local(0)).to_aml() == b"\x70ESEL\x60"
    assert And(Local(0), 1).to_aml() == b"\x7b\x60\x01\x00"  # no target: NullName
    assert And(Local(0), 1, Local(1)).to_aml() == b"\x7b\x60\x01\x61"
    assert LEqual(And(Local(0), 1), 1).to_aml() == b"\x93\x7b\x60\x01\x00\x01"
    assert Notify(NameRef("\\_SB.PWRB"), 0x80).to_aml() == b"\x86\\\x2e_SB_PWRB\x0a\x80"
    assert If(1, (Return(0),)).to_aml() == b"\xa0\x04\x01\xa4\x00"
    assert (Local(7).to_aml(), Arg(0).to_aml(), Arg(6).to_aml()) == (b"\x67", b"\x68", b"\x6e")
    for bad in (Local(8), Arg(7)):
        with pytest.raises(ValueError, match="does not exist"):
            bad.to_aml()


def test_method_body_round_trip() -> None:
    method = Method(
        "_EVT",
        1,
        (
            Store(NameRef("ESEL"), Local(0)),
            If(LEqual(And(Local(0), 1), 1), (Notify(NameRef("\\_SB.PWRB"), 0x80),)),
        ),
        serialized=True,
    )
    (node,) = _parse_terms(method.to_aml())
    assert (node.kind, node.name, node.value) == ("Method", "_EVT", 0x09)
    store, if_ = node.children
    assert [c.kind for c in store.children] == ["NameRef", "Local"]
    predicate, notify = if_.children
    assert predicate.kind == "LEqual"
    assert [c.kind for c in predicate.children] == ["And", "Integer"]
    assert [(c.kind, c.name, c.value) for c in notify.children] == [
        ("NameRef", "\\_SB_.PWRB", None),
        ("Integer", "", 0x80),
    ]


# --- Resource descriptors (§6.4) ---


def test_irq_no_flags() -> None:
    assert IRQNoFlags((4,)).to_bytes() == b"\x22\x10\x00"
    assert IRQNoFlags((8,)).to_bytes() == b"\x22\x00\x01"
    assert IRQNoFlags((1, 12)).to_bytes() == b"\x22\x02\x10"
    with pytest.raises(ValueError, match="ISA IRQs"):
        IRQNoFlags((16,)).to_bytes()


def test_io_port() -> None:
    # Tag 0x47 (item 8, length 7), Decode16, min 0x3F8, max 0x3F8, alignment 1, length 8.
    assert IO(0x3F8, 0x3F8, 1, 8).to_bytes() == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert IO(0x60, 0x60, 1, 1, decode16=False).to_bytes()[1] == 0
    with pytest.raises(ValueError, match="port range"):
        IO(0x10000, 0x10000, 1, 1).to_bytes()


def test_memory32_fixed() -> None:
    # Tag 0x86, length 9, read-write, base, length.
    expected = b"\x86\x09\x00\x01\x00\x00\x00\xd0\x00\x10\x00\x00"
    assert Memory32Fixed(0xD0000000, 0x1000).to_bytes() == expected
    assert Memory32Fixed(0xD0000000, 0x1000, writable=False).to_bytes()[3] == 0
    with pytest.raises(ValueError, match="below 4 GiB"):
        Memory32Fixed(0xFFFFF000, 0x2000).to_bytes()


def test_extended_interrupt() -> None:
    # Tag 0x89, length 6, flags consumer|edge = 0x03, one interrupt, GSI 16.
    assert ExtendedInterrupt((16,)).to_bytes() == b"\x89\x06\x00\x03\x01\x10\x00\x00\x00"
    level = ExtendedInterrupt(
        (5, 9),
        consumer=False,
        trigger=Trigger.LEVEL,
        polarity=Polarity.ACTIVE_LOW,
        sharing=Sharing.SHARED,
        wake_capable=True,
    )
    assert level.to_bytes() == b"\x89\x0a\x00\x1c\x02\x05\x00\x00\x00\x09\x00\x00\x00"
    with pytest.raises(ValueError, match="Interrupt"):
        ExtendedInterrupt(()).to_bytes()


def test_resource_template_appends_end_tag() -> None:
    assert END_TAG == b"\x79\x00"
    template = ResourceTemplate((IRQNoFlags((4,)),))
    # PkgLength 8: itself, BufferSize (2), IRQ descriptor (3), End tag (2).
    assert template.to_aml() == b"\x11\x08\x0a\x05\x22\x10\x00\x79\x00"


def test_resource_template_round_trip() -> None:
    template = ResourceTemplate(
        (
            IO(0x60, 0x60, 1, 1),
            IRQNoFlags((1,)),
            Memory32Fixed(0xD0001000, 0x1000),
            ExtendedInterrupt((17,), trigger=Trigger.LEVEL, sharing=Sharing.SHARED),
        )
    )
    (node,) = _parse_terms(Name("_CRS", template).to_aml())
    assert acpi_parse.current_resources(acpi_parse.Node("Device", children=[node])) == [
        IoPort(True, 0x60, 0x60, 1, 1),
        Irq((1,), None),
        FixedMemory32(True, 0xD0001000, 0x1000),
        ExtInterrupt(True, False, False, True, False, (17,)),
    ]
