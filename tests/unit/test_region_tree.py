"""Flattening region trees: priorities, overlap, containers, aliases, and a reference model per address."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evmm.address_space import Alias, Container, Io, Ram, Region, flatten
from evmm.address_space.flatview import FlatView
from evmm.errors import ConfigError


class Regs:
    """A register file that answers its offset, so a test sees which offset a device was given."""

    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def io(name: str, size: int) -> Io:
    return Io(name, size, Regs())


def ram(name: str, size: int) -> Ram:
    return Ram(name, mmap.mmap(-1, size))


def ranges(view: FlatView) -> list[tuple[int, int, str, int]]:
    return [(r.start, r.size, r.region.name, r.offset_in_region) for r in view.ranges]


def test_one_ram_region_is_one_range() -> None:
    root = Container("root", 1 << 32)
    root.add(ram("ram", 0x10000), 0x100000)
    assert ranges(flatten(root)) == [(0x100000, 0x10000, "ram", 0)]


def test_a_higher_priority_region_cuts_a_hole_in_a_lower_one() -> None:
    root = Container("root", 1 << 20)
    root.add(ram("ram", 0x10000), 0)
    root.add(io("dev", 0x1000), 0x4000, priority=1)
    assert ranges(flatten(root)) == [
        (0x0, 0x4000, "ram", 0),
        (0x4000, 0x1000, "dev", 0),
        (0x5000, 0xB000, "ram", 0x5000),
    ]


def test_a_lower_priority_region_shows_only_where_nothing_else_is() -> None:
    root = Container("root", 1 << 20)
    root.add(ram("ram", 0x4000), 0x1000)
    root.add(io("under", 0x8000), 0, priority=-1)
    assert ranges(flatten(root)) == [
        (0x0, 0x1000, "under", 0),
        (0x1000, 0x4000, "ram", 0),
        (0x5000, 0x3000, "under", 0x5000),
    ]


def test_equal_priority_the_later_region_is_on_top_and_a_move_brings_it_up() -> None:
    root = Container("root", 1 << 20)
    a, b = io("a", 0x2000), io("b", 0x2000)
    root.add(a, 0)
    root.add(b, 0x1000)
    assert ranges(flatten(root)) == [(0x0, 0x1000, "a", 0), (0x1000, 0x2000, "b", 0)]
    root.move(a, 0x800)
    assert ranges(flatten(root)) == [(0x800, 0x2000, "a", 0), (0x2800, 0x800, "b", 0x1800)]


def test_a_container_places_its_children_and_its_priority_covers_them_all() -> None:
    root = Container("root", 1 << 20)
    root.add(ram("ram", 0x10000), 0)
    bank = Container("bank", 0x3000)
    bank.add(io("r0", 0x1000), 0)
    bank.add(io("r2", 0x1000), 0x2000, priority=-5)  # low inside the bank, still above the RAM
    root.add(bank, 0x8000, priority=1)
    assert ranges(flatten(root)) == [
        (0x0, 0x8000, "ram", 0),
        (0x8000, 0x1000, "r0", 0),
        (0x9000, 0x1000, "ram", 0x9000),  # the bank's hole shows what is below the bank
        (0xA000, 0x1000, "r2", 0),
        (0xB000, 0x5000, "ram", 0xB000),
    ]


def test_an_alias_shows_a_window_of_its_target_elsewhere() -> None:
    pci = Container("pci-mem", 1 << 40)
    pci.add(io("bar-in", 0x1000), 0xC000_2000)
    pci.add(io("bar-edge", 0x2000), 0xCFFF_F000)  # straddles the end of the window
    pci.add(io("bar-out", 0x1000), 0x1000)  # outside every window: decoded by nothing
    pci.add(io("bar-high", 0x4000), 0x80_0000_0000)
    root = Container("system", 1 << 40)
    root.add(Alias("hole32", pci, 0xC000_0000, 0x1000_0000), 0xC000_0000)
    root.add(Alias("hole64", pci, 0x80_0000_0000, 0x10_0000_0000), 0x80_0000_0000)
    assert ranges(flatten(root)) == [
        (0xC000_2000, 0x1000, "bar-in", 0),
        (0xCFFF_F000, 0x1000, "bar-edge", 0),
        (0x80_0000_0000, 0x4000, "bar-high", 0),
    ]


def test_an_alias_may_show_its_target_at_another_address() -> None:
    target = Container("target", 0x10000)
    target.add(io("regs", 0x100), 0x4000)
    root = Container("root", 1 << 20)
    root.add(Alias("window", target, 0x4000, 0x1000), 0x80000)
    view = flatten(root)
    (only,) = view.ranges
    assert (only.start, only.size, only.region.name, only.offset_in_region) == (0x80000, 0x100, "regs", 0)
    assert view.find(0x80010) is only and view.find(0x80100) is None and view.find(0x7FFFF) is None


def test_a_region_in_two_places_through_an_alias_is_visible_twice() -> None:
    root = Container("root", 1 << 20)
    regs = io("regs", 0x1000)
    root.add(regs, 0x1000)
    root.add(Alias("again", regs, 0x800, 0x800), 0x8000)
    assert ranges(flatten(root)) == [(0x1000, 0x1000, "regs", 0), (0x8000, 0x800, "regs", 0x800)]


def test_bad_placements_are_refused_in_one_line() -> None:
    root = Container("root", 0x10000)
    child = io("dev", 0x1000)
    with pytest.raises(ConfigError, match="does not fit"):
        root.add(child, 0xF800)
    root.add(child, 0)
    with pytest.raises(ConfigError, match="already placed"):
        root.add(child, 0x2000)
    with pytest.raises(ConfigError, match="does not fit"):
        root.move(child, 0x10000)
    with pytest.raises(ConfigError, match="outside"):
        Alias("a", root, 0x8000, 0x10000)
    with pytest.raises(ConfigError, match="not in"):
        Container("other", 0x10).remove(child)
    with pytest.raises(ConfigError, match="would contain itself"):
        root.add(root, 0)


def test_a_loop_through_aliases_is_refused_when_it_would_close() -> None:
    root = Container("root", 0x10000)
    inner = Container("inner", 0x1000)
    root.add(inner, 0)
    with pytest.raises(ConfigError, match="back in inner would contain itself"):
        inner.add(Alias("back", root, 0, 0x100), 0)
    # Through a container that is not in the tree, only shown by an alias in it.
    outside = Container("outside", 0x1000)
    root.add(Alias("view", outside, 0, 0x1000), 0x2000)
    with pytest.raises(ConfigError, match="up in outside would contain itself"):
        outside.add(Alias("up", root, 0, 0x100), 0)
    outside.add(Alias("sideways", inner, 0, 0x100), 0)  # two paths to inner, but no loop
    outside.add(io("dev", 0x10), 0x800)
    assert ranges(flatten(root)) == [(0x2800, 0x10, "dev", 0)]


def test_ioeventfds_appear_where_their_region_is_visible() -> None:
    root = Container("root", 1 << 20)
    regs = io("regs", 0x1000)
    regs.add_ioeventfd(0x10, 4, fd=7, datamatch=1)
    regs.add_ioeventfd(0x800, 2, fd=8)
    root.add(regs, 0x4000)
    root.add(io("cover", 0x100), 0x4800 - 0x80, priority=1)  # hides fd 8 (at 0x4800) entirely
    view = flatten(root)
    assert [(e.addr, e.length, e.fd, e.datamatch) for e in view.ioeventfds] == [(0x4010, 4, 7, 1)]
    with pytest.raises(ConfigError, match="no 4-byte ioeventfd at 0xffe"):
        regs.add_ioeventfd(0xFFE, 4, fd=9)


def test_an_ioeventfd_half_hidden_is_not_registered() -> None:
    root = Container("root", 1 << 20)
    regs = io("regs", 0x1000)
    regs.add_ioeventfd(0x0FE, 4, fd=7)
    root.add(regs, 0)
    root.add(io("cover", 0x100), 0x100, priority=1)
    assert flatten(root).ioeventfds == ()


# --- the reference model: who decodes each address, from the definition alone ---


def who(region: Region, base: int, addr: int) -> tuple[str, int] | None:
    """(terminal region, offset in it) decoding ``addr``, or None: the first of the precedence-ordered
    children (or the alias's target) that decodes it."""
    if not base <= addr < base + region.size:
        return None
    if isinstance(region, Container):
        for child in region.children:
            found = who(child, base + child.offset, addr)
            if found is not None:
                return found
        return None
    if isinstance(region, Alias):
        return who(region.target, base - region.target_offset, addr)
    return (region.name, addr - base)


SPAN = 0x400

regions = st.lists(
    st.tuples(
        st.integers(0, SPAN - 1),  # offset
        st.integers(1, SPAN // 2),  # size
        st.integers(-2, 2),  # priority
        st.sampled_from(["io", "container", "alias"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(regions, st.data())
def test_flattening_agrees_with_the_reference_at_every_address(
    specs: list[tuple[int, int, int, str]], data: st.DataObject
) -> None:
    root = Container("root", SPAN)
    containers = [root]
    placed: list[Region] = []
    for i, (offset, size, priority, kind) in enumerate(specs):
        parent = data.draw(st.sampled_from(containers))
        size = min(size, parent.size)
        offset = offset % (parent.size - size + 1)
        region: Region
        if kind == "container":
            region = Container(f"c{i}", size)
            containers.append(region)
        elif kind == "alias" and placed:
            target = data.draw(st.sampled_from(placed))
            size = min(size, target.size)
            offset = offset % (parent.size - size + 1)
            region = Alias(f"a{i}", target, data.draw(st.integers(0, target.size - size)), size)
        else:
            region = io(f"r{i}", size)
        try:
            parent.add(region, offset, priority)
        except ConfigError as e:
            assert "would contain itself" in str(e)
            continue
        placed.append(region)
    view = flatten(root)
    for addr in range(SPAN):
        fr = view.find(addr)
        got = None if fr is None else (fr.region.name, fr.offset_in_region + addr - fr.start)
        assert got == who(root, 0, addr), hex(addr)
    assert all(a.end <= b.start for a, b in zip(view.ranges, view.ranges[1:], strict=False))
