"""`Submodules`: the base of every typed spec record, validating each slot on construction."""

from __future__ import annotations

import dataclasses
import types
import typing

from protoformer.spec.check import SpecError, check_builder, clip

__all__ = ["Submodules", "slot_protocols", "validate_submodules"]

_hints_cache: dict[type, dict[str, tuple[type[object] | None, bool]]] = {}


def _is_builder_protocol(hint: object) -> bool:
    return isinstance(hint, type) and bool(getattr(hint, "_is_protocol", False)) and any(
        "__call__" in vars(k) for k in hint.__mro__ if getattr(k, "_is_protocol", False))


def slot_protocols(cls: type) -> dict[str, tuple[type[object] | None, bool]]:
    """For each field of a Submodules dataclass: (the type it holds, whether None is allowed).

    The type is a Builder protocol for a slot, a Submodules class for a nested record, or
    None when the field is neither (it is then not checked).
    """
    cached = _hints_cache.get(cls)
    if cached is not None:
        return cached
    try:
        hints = typing.get_type_hints(cls)
    except Exception as error:  # NameError mostly; user annotations may raise anything
        raise SpecError(
            f"{cls.__qualname__}: cannot evaluate the slot annotations "
            f"({type(error).__name__}: {clip(str(error))}); every name "
            "used in a Submodules annotation must be importable at runtime in its module "
            "(not only under `if TYPE_CHECKING:`)") from error
    result: dict[str, tuple[type[object] | None, bool]] = {}
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name)
        optional = False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = typing.get_args(hint)
            optional = type(None) in args
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else None
        if _is_builder_protocol(hint) or (isinstance(hint, type) and issubclass(hint, Submodules)):
            assert isinstance(hint, type)
            result[field.name] = (hint, optional)
        else:
            result[field.name] = (None, optional)
    _hints_cache[cls] = result
    return result


def validate_submodules(record: object) -> None:
    """Check every slot of a Submodules dataclass; raise one `SpecError` listing every problem."""
    cls = type(record)
    errors: list[str] = []
    for name, (expected, optional) in slot_protocols(cls).items():
        if expected is None:
            continue
        value = getattr(record, name)
        slot = f"{cls.__qualname__}.{name}"
        if value is None:
            if not optional:
                errors.append(f"{slot}: is None, but this slot is required "
                              f"(type {expected.__qualname__}, not optional)")
            continue
        if issubclass(expected, Submodules):  # a nested record, not a builder
            if not isinstance(value, expected):
                errors.append(f"{slot}: expected a {expected.__qualname__}, "
                              f"got {type(value).__qualname__}")
            continue
        protocol: type[object] = expected
        try:
            check_builder(value, protocol, slot=slot)
        except SpecError as error:
            errors.append(str(error))
    if errors:
        raise SpecError("\n".join(errors))


class Submodules:
    """Base of the `XSubmodules` dataclasses: each field is a slot typed by a Builder protocol.

    Subclasses are `@dataclass`es; construction runs `check_builder` on every slot (and checks
    nested Submodules records), so a miswired spec raises `SpecError` right where it is built.
    """

    def __post_init__(self) -> None:
        validate_submodules(self)
