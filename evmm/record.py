"""Records: dataclass-compatible value classes whose ``__init__`` is compiled when first used.

Why not ``@dataclasses.dataclass``: on Python 3.11 it compiles six generated functions per class (``__init__``,
``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``, ``__delattr__``), about 1.3 ms a class.  evmm defines
over a hundred and one boot instantiates well under half of them, so plain dataclasses were a quarter of
``evmm run``'s start-up, and start-up is most of a boot where Python runs 30x slower (the KVM test host;
docs/performance.md).  A record compiles only its ``__init__`` (generated code, as fast per instance as a
dataclass's), and only when the class is first instantiated; equality, hashing, ``repr`` and the frozen
guards are shared functions over the field names.  ``dataclasses.fields``, ``replace``, ``asdict`` and
``is_dataclass`` work on records unchanged, and mypy types them as dataclasses (PEP 681).

Supported: annotated fields in order (inherited from record bases first), defaults, ``field(default=...)``
and ``field(default_factory=...)``, ``ClassVar`` annotations skipped, ``__post_init__``, ``frozen``,
``slots``; a method the class defines itself is kept.  Not supported (evmm uses none): ``InitVar``,
``kw_only``, ``order``, ``field(init=False, ...)``.

It leans on details of CPython's dataclasses module that are not its API (the ``_FIELD`` marker ``fields()``
selects on, ``Field``'s attributes), checked on CPython 3.11, 3.12 and 3.13 (tests/unit/test_record.py).  On
any other interpreter ``record`` is ``dataclasses.dataclass`` itself: slower to define, the same to use.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform, get_origin, overload

T = TypeVar("T")

_MISSING = dataclasses.MISSING
_lock = threading.Lock()
_NATIVE = (
    sys.implementation.name == "cpython"
    and (3, 11) <= sys.version_info[:2] <= (3, 13)
    and hasattr(dataclasses, "_FIELD")
)


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = False, slots: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def record(
    cls: type[T] | None = None, /, *, frozen: bool = False, slots: bool = False
) -> type[T] | Callable[[type[T]], type[T]]:
    """``@record``, ``@record(frozen=True)``, ``@record(frozen=True, slots=True)``: as ``@dataclass``."""

    def wrap(c: type[T]) -> type[T]:
        if not _NATIVE:
            return dataclasses.dataclass(frozen=frozen, slots=slots)(c)
        return _make(c, frozen=frozen, slots=slots)

    return wrap if cls is None else wrap(cls)


def _is_classvar(annotation: object) -> bool:
    if isinstance(annotation, str):  # ``from __future__ import annotations``: every annotation is a string
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    return annotation is ClassVar or get_origin(annotation) is ClassVar


def _own_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    out: dict[str, dataclasses.Field[Any]] = {}
    for name, annotation in inspect.get_annotations(cls).items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, _MISSING)
        if isinstance(value, dataclasses.Field):
            f = value
        elif isinstance(value, (list, dict, set)):
            raise ValueError(f"{cls.__qualname__}.{name}: a mutable default is shared; use default_factory")
        else:
            f = dataclasses.field(default=value)
        if not f.init or f.kw_only is True:
            raise TypeError(f"{cls.__qualname__}.{name}: records do not support init=False or kw_only")
        f.name = name
        f.type = annotation
        f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]  # what fields()/replace() select on
        out[name] = f
    return out


def _make(cls: type[T], *, frozen: bool, slots: bool) -> type[T]:
    fields: dict[str, dataclasses.Field[Any]] = {}
    for base in reversed(cls.__mro__[1:]):
        fields.update(getattr(base, "__dataclass_fields__", {}))
    fields.update(_own_fields(cls))
    seen_default = False
    for f in fields.values():
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        if seen_default and not has_default:
            raise TypeError(f"{cls.__qualname__}: non-default field {f.name!r} follows a default field")
        seen_default |= has_default
    names = tuple(fields)

    if slots:
        cls = _with_slots(cls, names)
    for name, f in fields.items():
        # As dataclasses do: a plain default stays a class attribute; a Field object does not.
        if not slots and name in cls.__dict__ and isinstance(cls.__dict__[name], dataclasses.Field):
            if f.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)

    ns = cls.__dict__
    methods: dict[str, object] = {"__dataclass_fields__": fields, "__match_args__": names}
    if "__init__" not in ns:
        methods["__init__"] = _lazy_init(cls, fields, frozen)
    if "__repr__" not in ns:
        methods["__repr__"] = _repr(names)
    if "__eq__" not in ns:
        methods["__eq__"] = _eq(names)
    if frozen:
        if "__hash__" not in ns or ns["__hash__"] is None:
            methods["__hash__"] = _hash(names)
        methods["__setattr__"] = _frozen_setattr(cls, names)
        methods["__delattr__"] = _frozen_delattr(cls, names)
        if slots:  # copy and pickle restore slots with setattr, which a frozen record refuses
            methods["__getstate__"] = _getstate(names)
            methods["__setstate__"] = _setstate(names)
    elif "__hash__" not in ns:
        methods["__hash__"] = None  # eq without frozen: unhashable, as a dataclass is
    for name, value in methods.items():
        setattr(cls, name, value)
    return cls


def _with_slots(cls: type[Any], names: tuple[str, ...]) -> type[Any]:
    inherited = {s for base in cls.__mro__[1:] for s in base.__dict__.get("__slots__", ())}
    body = {k: v for k, v in cls.__dict__.items() if k not in names and k not in ("__dict__", "__weakref__")}
    body["__slots__"] = tuple(n for n in names if n not in inherited)
    metaclass: Any = type(cls)
    new: type[Any] = metaclass(cls.__name__, cls.__bases__, body)
    new.__qualname__ = cls.__qualname__
    return new


def _lazy_init(cls: type, fields: dict[str, dataclasses.Field[Any]], frozen: bool) -> Callable[..., None]:
    """An ``__init__`` that compiles the real one on first call, puts it on the class and runs it."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        real = cls.__dict__["__init__"]
        if real is __init__:
            with _lock:
                real = cls.__dict__["__init__"]
                if real is __init__:
                    real = _compile_init(cls, fields, frozen)
                    type.__setattr__(cls, "__init__", real)
        real(self, *args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _compile_init(cls: type, fields: dict[str, dataclasses.Field[Any]], frozen: bool) -> Callable[..., None]:
    env: dict[str, Any] = {"_MISSING": _MISSING, "_set": object.__setattr__}
    params, body = ["self"], []
    for name, f in fields.items():
        if f.default_factory is not _MISSING:
            env[f"_factory_{name}"] = f.default_factory
            params.append(f"{name}=_MISSING")
            body.append(f"    if {name} is _MISSING: {name} = _factory_{name}()")
        elif f.default is not _MISSING:
            env[f"_default_{name}"] = f.default
            params.append(f"{name}=_default_{name}")
        else:
            params.append(name)
        body.append(f"    _set(self, {name!r}, {name})" if frozen else f"    self.{name} = {name}")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(source, env)  # the same generated code a dataclass has, compiled once per class, on first use
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if not names:
        return lambda _obj: ()
    if len(names) == 1:
        one = operator.attrgetter(names[0])
        return lambda obj: (one(obj),)
    return operator.attrgetter(*names)


def _repr(names: tuple[str, ...]) -> Callable[[Any], str]:
    get = _getter(names)

    def __repr__(self: Any) -> str:
        values = ", ".join(f"{n}={v!r}" for n, v in zip(names, get(self), strict=True))
        return f"{type(self).__qualname__}({values})"

    return __repr__


def _eq(names: tuple[str, ...]) -> Callable[[Any, object], bool]:
    get = _getter(names)

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is self.__class__:
            return get(self) == get(other)
        return NotImplemented

    return __eq__


def _hash(names: tuple[str, ...]) -> Callable[[Any], int]:
    get = _getter(names)

    def __hash__(self: Any) -> int:
        return hash(get(self))

    return __hash__


def _frozen_setattr(cls: type, names: tuple[str, ...]) -> Callable[[Any, str, Any], None]:
    fieldset = frozenset(names)

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in fieldset:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    return __setattr__


def _frozen_delattr(cls: type, names: tuple[str, ...]) -> Callable[[Any, str], None]:
    fieldset = frozenset(names)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in fieldset:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        object.__delattr__(self, name)

    return __delattr__


def _getstate(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    get = _getter(names)

    def __getstate__(self: Any) -> tuple[Any, ...]:
        return get(self)

    return __getstate__


def _setstate(names: tuple[str, ...]) -> Callable[[Any, tuple[Any, ...]], None]:
    def __setstate__(self: Any, state: tuple[Any, ...]) -> None:
        for name, value in zip(names, state, strict=True):
            object.__setattr__(self, name, value)

    return __setstate__
