"""Edit and compare specs by slot path: `override`, `apply_overrides`, `diff`, `spec_equal`.

A slot path walks record fields with dots. Through a `functools.partial` the next segment
names one of its keywords, so the canonical path to a slot of `partial(SelfAttention,
submodules=SelfAttentionSubmodules(...))` is `self_attention.submodules.core_attention`; as an
alias the `submodules` segment may be left out (`self_attention.core_attention`) when the
partial has no keyword of that name. `diff` always reports canonical paths.

An override is "PATH=VALUE". The VALUE of a builder slot is a name "package.module:Name"
(checked against the import allowlist), `null`/`None` for an optional slot, or a JSON
object as written by `to_dict` (a partial or a record). The VALUE of a partial's keyword (or
of a plain data field) is a JSON literal; for a keyword that holds an enum member or a torch
dtype a bare member name (`causal`, `bfloat16`) is accepted too, and "package.module:Name"
sets a class or function. Naming a new keyword of a partial adds it; naming a keyword of a
slot that holds a plain class wraps the class into `functools.partial(cls, keyword=value)`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast, overload

from protoformer.spec.check import SpecError
from protoformer.spec.layers import LAYERS_PATH, layer_groups, parse_layer_range, range_label
from protoformer.spec.names import DEFAULT_ALLOW, is_named_builder, normalize_allow
from protoformer.spec.serialize import (
    decode_builder,
    decode_value,
    is_partial,
    partial_parts,
    record_fields,
)
from protoformer.spec.submodules import Submodules, slot_protocols

__all__ = ["SpecDifference", "apply_overrides", "describe_value", "diff", "override", "spec_equal"]

S = TypeVar("S", bound=Submodules)


class _Absent:
    """A keyword a partial does not set (a diff side, or a new keyword for an override)."""

    def __repr__(self) -> str:
        return "(not set)"


_ABSENT = _Absent()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _init_names(record: object) -> list[str]:
    return [f.name for f in record_fields(type(record))]


def _make_partial(func: object, args: tuple[object, ...], keywords: dict[str, object]) -> object:
    return functools.partial(cast("Callable[..., object]", func), *args, **keywords)


# ---------------------------------------------------------------------------------------------
# Comparison.


@dataclass(frozen=True)
class SpecDifference:
    """One slot (or keyword) whose builder or arguments differ between two specs."""

    path: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.path}: {self.old} -> {self.new}"


def describe_value(value: object) -> str:
    """A short, stable description of a slot or keyword value, for diffs and messages."""
    if value is None:
        return "None"
    if isinstance(value, Submodules):
        return f"{type(value).__qualname__}(...)"
    if is_partial(value):
        func, args, keywords = partial_parts(value)
        bound = [describe_value(a) for a in args]
        bound += [f"{k}={describe_value(v)}" for k, v in keywords.items()]
        return f"partial({', '.join([describe_value(func), *bound])})"
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if is_named_builder(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', '?')}"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, Submodules):
        return all(_same(getattr(a, name), getattr(b, name)) for name in _init_names(a))
    if is_partial(a):
        return _same(partial_parts(a), partial_parts(b))
    if isinstance(a, (list, tuple)):
        left = cast("Sequence[object]", a)
        right = cast("Sequence[object]", b)
        return len(left) == len(right) and all(
            _same(x, y) for x, y in zip(left, right, strict=True))
    if isinstance(a, dict):
        left_map = cast("dict[object, object]", a)
        right_map = cast("dict[object, object]", b)
        return left_map.keys() == right_map.keys() and all(
            _same(v, right_map[k]) for k, v in left_map.items())
    try:
        return bool(a == b)
    except Exception:  # an exotic value whose == fails or is ambiguous: not provably equal
        return False


def spec_equal(a: object, b: object) -> bool:
    """Whether two specs (or slot values) are the same: same record types, the very same
    classes and functions, partials with equal arguments. `from_dict(to_dict(s))` is
    `spec_equal` to `s` (plain `==` is not, because `functools.partial` compares by identity).
    """
    return _same(a, b)


def _diff(a: object, b: object, path: str, out: list[SpecDifference]) -> None:
    if _same(a, b):
        return
    if isinstance(a, Submodules) and type(a) is type(b):
        for name in _init_names(a):
            _diff(getattr(a, name), getattr(b, name), _join(path, name), out)
        return
    if is_partial(a) and is_partial(b):
        func_a, args_a, keywords_a = partial_parts(a)
        func_b, args_b, keywords_b = partial_parts(b)
        if func_a is func_b and _same(args_a, args_b):
            for key in [*keywords_a, *(k for k in keywords_b if k not in keywords_a)]:
                _diff(keywords_a.get(key, _ABSENT), keywords_b.get(key, _ABSENT),
                      _join(path, key), out)
            return
    out.append(SpecDifference(path or "(root)", describe_value(a), describe_value(b)))


def _as_layers(spec: object) -> list[object] | None:
    return list(cast("Sequence[object]", spec)) if isinstance(spec, (list, tuple)) else None


def _diff_layers(a: Sequence[object], b: Sequence[object]) -> list[SpecDifference]:
    """Per-layer differences under `layers.N`; neighbours that differ alike share `layers.N-M`."""
    per_layer: list[list[tuple[str, str, str]]] = []
    for left, right in zip(a, b, strict=False):
        found: list[SpecDifference] = []
        _diff(left, right, "", found)
        per_layer.append([(d.path, d.old, d.new) for d in found])
    out: list[SpecDifference] = []
    for first, last in layer_groups(per_layer, lambda x, y: x == y):
        prefix = _join(LAYERS_PATH, range_label(first, last))
        out += [SpecDifference(prefix if path == "(root)" else _join(prefix, path), old, new)
                for path, old, new in per_layer[first]]
    if len(a) != len(b):
        out.append(SpecDifference(LAYERS_PATH, f"{len(a)} layers", f"{len(b)} layers"))
    return out


def diff(a: Submodules | Sequence[Submodules],
         b: Submodules | Sequence[Submodules]) -> list[SpecDifference]:
    """The slot paths whose builder or arguments differ from `a` to `b`, deepest first reached.

    Records of the same type are compared field by field, and partials of the same function
    with the same positional arguments keyword by keyword (a keyword set on one side only is
    shown as "(not set)"); anything else that differs is one difference at its path.

    Lists of per-layer specs are compared layer by layer (paths `layers.3.mlp...`, or
    `layers.3-60.mlp...` for neighbours that differ alike); a single spec against a list
    stands for that spec in every layer; lists of different lengths also report `layers`.
    """
    left: object = a
    right: object = b
    layers_a, layers_b = _as_layers(left), _as_layers(right)
    if layers_a is not None and layers_b is not None:
        return _diff_layers(layers_a, layers_b)
    if layers_a is not None:
        return _diff_layers(layers_a, [right] * len(layers_a))
    if layers_b is not None:
        return _diff_layers([left] * len(layers_b), layers_b)
    out: list[SpecDifference] = []
    _diff(left, right, "", out)
    return out


# ---------------------------------------------------------------------------------------------
# Overrides.


@dataclass(frozen=True)
class _Override:
    text: str  # the whole "PATH=VALUE", for messages
    value: str
    allow: tuple[str, ...]

    def error(self, message: str) -> SpecError:
        return SpecError(f"override {self.text!r}: {message}")


def _parse_json(text: str) -> tuple[bool, object]:
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _slot_value(change: _Override, path: str) -> object:
    """The new value of a builder slot: a name, null, or a JSON partial/record."""
    text = change.value.strip()
    if text in ("null", "None"):
        return None
    if text.startswith("{"):
        ok, data = _parse_json(text)
        if not ok:
            raise change.error(f"{path} = {text!r} is not valid JSON")
        return decode_builder(data, allow=change.allow, path=path)
    if ":" in text:
        return decode_builder(text, allow=change.allow, path=path)
    raise change.error(f"{path} takes a builder 'package.module:Name', null, or a JSON object "
                       f"(a partial or record as to_dict writes it); got {text!r}")


def _keyword_value(change: _Override, path: str, current: object) -> object:
    """The new value of a partial's keyword or a data field: a JSON literal (or a shorthand)."""
    text = change.value.strip()
    if text == "None":
        return None
    ok, data = _parse_json(text)
    coerce = isinstance(current, enum.Enum) or _is_dtype(current)
    if ok and not (coerce and isinstance(data, str)):
        return decode_value(data, allow=change.allow, path=path)
    name = data if isinstance(data, str) else text
    if isinstance(current, enum.Enum):
        members = dict(type(current).__members__)
        if name not in members:
            raise change.error(f"{path}: {type(current).__qualname__} has no member {name!r}; "
                               f"members: {list(members)}")
        return members[name]
    if coerce:
        return decode_value({"__dtype__": name}, allow=change.allow, path=path)
    if ":" in text:
        return decode_value({"__ref__": text}, allow=change.allow, path=path)
    raise change.error(f"{path} = {text!r} is not a JSON literal; strings need JSON quotes "
                       f"({path}='\"{text}\"'), a class or function is 'package.module:Name'")


def _is_dtype(value: object) -> bool:
    return type(value).__module__ == "torch" and type(value).__name__ == "dtype"


def _replace(record: Submodules, name: str, value: object, change: _Override,
             path: str) -> Submodules:
    try:
        return dataclasses.replace(record, **{name: value})  # type: ignore[type-var]  # pyright: ignore[reportArgumentType]  # records are dataclasses
    except SpecError as error:
        raise change.error(f"{path or 'spec root'}: {error}") from error
    except Exception as error:  # a record's own __post_init__ rules
        raise change.error(f"{path or 'spec root'}: rebuilding {type(record).__qualname__} "
                           f"failed: {type(error).__name__}: {error}") from error


def _in_record(record: Submodules, segments: list[str], change: _Override, path: str) -> Submodules:
    name, rest = segments[0], segments[1:]
    names = _init_names(record)
    if name not in names:
        raise change.error(f"{type(record).__qualname__} at {path or 'the spec root'} has no "
                           f"slot {name!r}; its slots are {names}")
    where = _join(path, name)
    current: object = getattr(record, name)
    if rest:
        new = _in_value(current, rest, change, where)
    elif slot_protocols(type(record))[name][0] is not None:
        new = _slot_value(change, where)
    else:
        new = _keyword_value(change, where, current)
    return _replace(record, name, new, change, path)


def _in_value(current: object, segments: list[str], change: _Override, path: str) -> object:
    if isinstance(current, Submodules):
        return _in_record(current, segments, change, path)
    name, rest = segments[0], segments[1:]
    where = _join(path, name)
    if is_partial(current):
        func, args, keywords = partial_parts(current)
        inner = keywords.get("submodules")
        if name in keywords:
            old = keywords[name]
            keywords[name] = (_in_value(old, rest, change, where) if rest
                              else _keyword_value(change, where, old))
            if isinstance(old, Submodules) and not isinstance(keywords[name], type(old)):
                # check_builder compares signatures, not keyword values: guard the record here
                raise change.error(f"{where} holds a {type(old).__qualname__} record; it takes "
                                   f"another {type(old).__qualname__} (as a JSON object), not "
                                   f"{describe_value(keywords[name])}")
        elif isinstance(inner, Submodules) and name in _init_names(inner):
            keywords["submodules"] = _in_record(inner, segments, change, _join(path, "submodules"))
        elif not rest:
            keywords[name] = _keyword_value(change, where, _ABSENT)
        else:
            raise change.error(f"{path} ({describe_value(current)}) has no keyword {name!r} "
                               "to descend into")
        return _make_partial(func, args, keywords)
    if is_named_builder(current):
        if rest:
            raise change.error(f"{path} holds {describe_value(current)}, which has no keyword "
                               f"{name!r} to descend into")
        return _make_partial(current, (), {name: _keyword_value(change, where, _ABSENT)})
    raise change.error(f"cannot reach {_join(where, '.'.join(rest)) if rest else where}: "
                       f"{path} holds {describe_value(current)}, which has no slots or keywords"
                       + (" (set the slot to a builder first)" if current is None else ""))


def _parse_override(text: object, allow: tuple[str, ...]) -> tuple[list[str], _Override]:
    if not isinstance(text, str):
        raise SpecError(f"an override is a 'PATH=VALUE' string, got {text!r}")
    path_text, sep, value = text.partition("=")
    if not sep:
        raise SpecError(f"override {text!r}: expected PATH=VALUE, e.g. "
                        "'self_attention.submodules.core_attention=package.module:Name'")
    segments = path_text.strip().split(".")
    _check_segments(text, path_text, segments)
    return segments, _Override(text, value, allow)


def _selected_layers(selector: str, count: int, change: _Override) -> range:
    if selector == "*":
        return range(count)
    parsed = parse_layer_range(selector)
    if parsed is None:
        raise change.error(f"{_join(LAYERS_PATH, selector)}: name layers as "
                           f"{LAYERS_PATH}.N, {LAYERS_PATH}.N-M (0-based, inclusive) or "
                           f"{LAYERS_PATH}.*")
    first, last = parsed
    if last >= count:
        raise change.error(f"{_join(LAYERS_PATH, selector)}: the spec has {count} layer(s) "
                           f"(0..{count - 1})")
    return range(first, last + 1)


def _in_layers(specs: list[Submodules], path_text: str, change: _Override) -> list[Submodules]:
    segments = path_text.strip().split(".")
    if len(segments) == 2 and segments[0] == LAYERS_PATH:
        raise change.error(f"{path_text.strip()} names whole layers; override a slot inside "
                           f"them, e.g. {path_text.strip()}.mlp=package.module:Name")
    if len(segments) < 3 or segments[0] != LAYERS_PATH:
        raise change.error(f"the spec is a list with one spec per layer: start the path with "
                           f"{LAYERS_PATH}.N, {LAYERS_PATH}.N-M or {LAYERS_PATH}.* (e.g. "
                           f"{LAYERS_PATH}.*.{path_text.strip()})")
    rest = segments[2:]
    _check_segments(change.text, path_text, rest)
    result = list(specs)
    for index in _selected_layers(segments[1], len(specs), change):
        result[index] = _in_record(specs[index], rest, change, _join(LAYERS_PATH, str(index)))
    return result


def _check_segments(text: str, path_text: str, segments: list[str]) -> None:
    for segment in segments:
        if not (segment.isascii() and segment.isidentifier()):
            raise SpecError(f"override {text!r}: path {path_text.strip()!r} has an invalid "
                            f"segment {segment!r}; a path is dot-separated slot and keyword names")


@overload
def override(spec: S, assignment: str, *, allow: Sequence[str] = DEFAULT_ALLOW) -> S: ...
@overload
def override(spec: Sequence[S], assignment: str, *,
             allow: Sequence[str] = DEFAULT_ALLOW) -> list[S]: ...
def override(spec: S | Sequence[S], assignment: str, *,
             allow: Sequence[str] = DEFAULT_ALLOW) -> S | list[S]:
    """A new spec with one "PATH=VALUE" assignment applied (see the module docstring).

    On a list with one spec per layer the path starts with the layers it changes:
    `layers.3.mlp...`, `layers.3-60.mlp...` (0-based, inclusive) or `layers.*.mlp...`; the
    result is a new list. `spec` is not changed. The result is re-validated; any problem (bad
    syntax, unknown path, a name outside `allow`, a miswired builder) raises `SpecError`
    naming the override.
    """
    layers = _as_layers(spec)
    if layers is None and not isinstance(spec, Submodules):
        raise SpecError(f"override expects a Submodules record or a list of them (one per "
                        f"layer), got {spec!r}")
    for index, item in enumerate(layers or []):
        if not isinstance(item, Submodules):
            raise SpecError(f"override: layer {index} of the list is {item!r}, not a "
                            "Submodules record")
    if not isinstance(assignment, str):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
        raise SpecError(f"an override is a 'PATH=VALUE' string, got {assignment!r}")
    if layers is not None:
        path_text, sep, value = assignment.partition("=")
        if not sep:
            raise SpecError(f"override {assignment!r}: expected PATH=VALUE, e.g. "
                            f"'{LAYERS_PATH}.3.mlp=package.module:Name'")
        change = _Override(assignment, value, normalize_allow(allow))
        try:
            return cast("list[S]", _in_layers(cast("list[Submodules]", layers), path_text,
                                              change))
        except RecursionError:
            raise SpecError(f"override {assignment[:80]!r}: the value is nested too deeply") \
                from None
    record = cast("S", spec)
    first_segment = assignment.partition("=")[0].strip().split(".")[0]
    if first_segment == LAYERS_PATH and LAYERS_PATH not in _init_names(record):
        raise SpecError(f"override {assignment!r}: this is one spec for every layer, so it has "
                        f"no per-layer paths; override a list with one spec per layer (e.g. "
                        f"[spec] * num_layers)")
    segments, change = _parse_override(assignment, normalize_allow(allow))
    try:
        result = _in_record(record, segments, change, "")
    except SpecError as error:
        prefix = f"override {assignment!r}: "
        if str(error).startswith(prefix):
            raise
        raise SpecError(prefix + str(error)) from error
    except RecursionError:  # as from_dict: a value nested deeper than the parser can follow
        raise SpecError(f"override {assignment[:80]!r}: the value is nested too deeply") \
            from None
    assert type(result) is type(record)
    return result


@overload
def apply_overrides(spec: S, assignments: Iterable[str], *,
                    allow: Sequence[str] = DEFAULT_ALLOW) -> S: ...
@overload
def apply_overrides(spec: Sequence[S], assignments: Iterable[str], *,
                    allow: Sequence[str] = DEFAULT_ALLOW) -> list[S]: ...
def apply_overrides(spec: S | Sequence[S], assignments: Iterable[str], *,
                    allow: Sequence[str] = DEFAULT_ALLOW) -> S | list[S]:
    """`override` for each "PATH=VALUE" in order (e.g. the CLI's repeated `--set`); a list of
    per-layer specs gives a new list."""
    if isinstance(assignments, str):
        raise SpecError(f"apply_overrides expects a list of 'PATH=VALUE' strings, got the single "
                        f"string {assignments!r}; wrap it in a list")
    result: S | list[S] = spec if isinstance(spec, Submodules) else list(spec)
    for assignment in assignments:
        result = override(result, assignment, allow=allow)
    return result
