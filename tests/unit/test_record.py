"""evmm.record behaves as @dataclass does for everything evmm uses, and costs far less to define."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import field
from typing import ClassVar

import pytest

from evmm.record import record


@record(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    KIND: ClassVar[str] = "point"


@record
class Bag:
    name: str
    items: list[int] = field(default_factory=list)
    size: int = field(default=3)


@record(frozen=True)
class Base:
    a: int


@record(frozen=True)
class Child(Base):
    b: str = "b"


@record
class Posted:
    n: int

    def __post_init__(self) -> None:
        self.double = self.n * 2


def test_init_defaults_and_factories() -> None:
    assert (Point(1).x, Point(1).y, Point(1, 2).y, Point(x=3, y=4).x) == (1, 0, 2, 3)
    b1, b2 = Bag("a"), Bag("b")
    b1.items.append(1)
    assert b2.items == [] and b1.size == 3  # a fresh list per instance
    assert Child(1).b == "b" and Child(1, "c").a == 1
    assert Posted(4).double == 8
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, 2, 3)  # type: ignore[call-arg]


def test_eq_hash_repr_as_a_dataclass() -> None:
    assert Point(1, 2) == Point(1, 2) and Point(1, 2) != Point(2, 1)
    as_tuple: object = (1, 2)
    assert Point(1, 2) != as_tuple
    assert hash(Point(1, 2)) == hash(Point(1, 2)) and len({Point(1), Point(1), Point(2)}) == 2
    assert repr(Point(1, 2)) == "Point(x=1, y=2)"
    assert repr(Child(1)) == "Child(a=1, b='b')"
    assert Base(1) != Child(1)  # equality is per exact class, as dataclasses compare
    with pytest.raises(TypeError):
        hash(Bag("a"))  # eq without frozen: unhashable, as a dataclass is
    assert Point.KIND == "point" and "KIND" not in [f.name for f in dataclasses.fields(Point)]


def test_frozen_refuses_assignment_and_deletion() -> None:
    p = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del p.x
    assert not hasattr(p, "__dict__")  # slots=True


def test_dataclasses_functions_work() -> None:
    assert dataclasses.is_dataclass(Point(1))
    assert [f.name for f in dataclasses.fields(Child)] == ["a", "b"]
    assert dataclasses.replace(Point(1, 2), y=5) == Point(1, 5)
    assert dataclasses.asdict(Bag("n", [1])) == {"name": "n", "items": [1], "size": 3}
    assert copy.copy(Point(1, 2)) == Point(1, 2) and copy.deepcopy(Child(1)) == Child(1)
    assert pickle.loads(pickle.dumps(Point(3, 4))) == Point(3, 4)
    assert Point.__match_args__ == ("x", "y")


def test_a_method_the_class_defines_is_kept() -> None:
    @record(frozen=True)
    class Named:
        n: int

        def __repr__(self) -> str:
            return f"<{self.n}>"

    assert repr(Named(1)) == "<1>"


def test_bad_definitions_fail_as_dataclasses_do() -> None:
    with pytest.raises(TypeError, match="follows a default"):

        @record
        class Bad:
            a: int = 1
            b: int  # type: ignore[misc]

    with pytest.raises(ValueError, match="mutable default"):

        @record
        class Shared:
            a: list[int] = []  # noqa: RUF012


def test_init_is_compiled_on_first_use_only() -> None:
    """The point of the module: defining a record compiles nothing; its first instance compiles __init__."""

    @record(frozen=True)
    class Lazy:
        a: int

    lazy = Lazy.__dict__["__init__"]
    assert "a" not in lazy.__code__.co_varnames  # the generic stand-in, (self, *args, **kwargs)
    assert Lazy(1).a == 1
    real = Lazy.__dict__["__init__"]
    assert real is not lazy and real.__code__.co_varnames[:2] == ("self", "a")
    assert Lazy(2).a == 2 and Lazy.__dict__["__init__"] is real


def test_on_an_interpreter_it_was_not_written_for_a_record_is_a_plain_dataclass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import evmm.record

    # Here (CPython 3.11 to 3.13) the records above are evmm's own: __dataclass_params__ is dataclass-only.
    assert evmm.record._NATIVE and not hasattr(Point, "__dataclass_params__")
    monkeypatch.setattr(evmm.record, "_NATIVE", False)

    @record(frozen=True, slots=True)
    class Plain:
        a: int
        b: str = "b"

    params = Plain.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen and Plain.__slots__ == ("a", "b")
    assert Plain(1) == Plain(1, "b") and repr(Plain(1)).endswith("Plain(a=1, b='b')")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Plain(1).a = 2  # type: ignore[misc]
