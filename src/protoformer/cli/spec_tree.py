"""Walk a Submodules record: every slot's path and the builder filling it, nested records too."""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from protoformer.spec import Submodules

__all__ = ["SlotEntry", "builder_label", "walk_spec"]


@dataclass(frozen=True)
class SlotEntry:
    """One field of a spec tree: a builder slot, an empty optional slot or a nested record."""

    path: str  # e.g. "self_attention.submodules.linear_qkv"
    label: str  # e.g. "ColumnParallelLinear"
    origin: str  # the builder's module, "" for records and empty slots
    value: object  # the builder, the nested Submodules record, or None

    @property
    def is_record(self) -> bool:
        return isinstance(self.value, Submodules)


def _value_label(value: object) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Submodules):
        return type(value).__name__
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str) and callable(value):
        return name
    return repr(value)


def _unwrap(builder: object) -> tuple[object, list[str], Submodules | None]:
    """The callable under nested partials, their bound arguments, and a `submodules` record."""
    bound: list[str] = []
    nested: Submodules | None = None
    while isinstance(builder, functools.partial):
        partial = cast("functools.partial[object]", builder)
        bound = [_value_label(a) for a in partial.args] + bound
        for key, value in partial.keywords.items():
            if key == "submodules" and isinstance(value, Submodules):
                nested = value
            else:
                bound.append(f"{key}={_value_label(value)}")
        builder = partial.func
    return builder, bound, nested


def builder_label(builder: object) -> tuple[str, str]:
    """(a short name with partial arguments shown, the module it comes from) for a builder."""
    base, bound, nested = _unwrap(builder)
    name = getattr(base, "__qualname__", None) or type(base).__qualname__
    module = getattr(base, "__module__", None) or type(base).__module__
    shown = [*bound, *(["submodules=..."] if nested is not None else [])]
    return (f"{name}({', '.join(shown)})" if shown else str(name)), str(module)


def walk_spec(record: Submodules, prefix: str = "") -> Iterator[SlotEntry]:
    """Every field of `record`, depth first; `partial(X, submodules=...)` records are entered."""
    if not dataclasses.is_dataclass(record):
        raise TypeError(f"{type(record).__qualname__} is a Submodules but not a @dataclass")
    for item in dataclasses.fields(record):
        value: object = getattr(record, item.name)
        path = f"{prefix}.{item.name}" if prefix else item.name
        if isinstance(value, Submodules):
            yield SlotEntry(path, type(value).__name__, "", value)
            yield from walk_spec(value, path)
        elif value is None:
            yield SlotEntry(path, "None", "", None)
        else:
            label, origin = builder_label(value)
            yield SlotEntry(path, label, origin, value)
            _, _, nested = _unwrap(value)
            if nested is not None:
                sub_path = f"{path}.submodules"
                yield SlotEntry(sub_path, type(nested).__name__, "", nested)
                yield from walk_spec(nested, sub_path)
