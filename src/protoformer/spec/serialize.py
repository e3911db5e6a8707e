"""Specs as data: `to_dict` and `from_dict`.

A spec (a tree of `Submodules` records) becomes plain JSON-compatible data::

    {"__submodules__": "protoformer.transformer.mlp:MLPSubmodules",
     "fields": {"linear_fc1": "protoformer.parallel.layers:ColumnParallelLinear", ...}}

Builders are named "package.module:QualName" (see `protoformer.spec.names`). A slot holds
such a string, a partial `{"__partial__": "module:Name", "args": [...], "kwargs": {...}}`
(nested partials are merged), a nested record, or null. A list with one spec per layer is
written `{"__layers__": {"0-2": record, "3-60": record}}` (equal neighbours once, under their
0-based inclusive range of layers). Keyword values (and plain data fields
of a record) are JSON values or one of the tagged objects `{"__enum__":
"module:Class.member"}`, `{"__dtype__": "bfloat16"}`, `{"__tuple__": [...]}`, `{"__ref__":
"module:Name"}` (a class or function), a partial or a record; `{"__null__": true}` also reads
as null (TOML has no null). Keys starting with "__" are reserved for these tags.

`from_dict` resolves names only under the `allow` prefixes, and builds every record, so the
runtime conformance check runs on every slot. Any problem raises `SpecError` naming the path
in the spec ("self_attention.submodules.core_attention").
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeAlias, cast

from protoformer.spec.check import SpecError
from protoformer.spec.layers import (
    LAYERS,
    LAYERS_PATH,
    layer_groups,
    parse_layer_range,
    range_label,
)
from protoformer.spec.names import (
    DEFAULT_ALLOW,
    is_identifier,
    join_path,
    normalize_allow,
    reference_of,
    resolve_builder,
    resolve_reference,
    short_repr,
    where,
)
from protoformer.spec.submodules import Submodules, slot_protocols

__all__ = [
    "JSONValue",
    "decode_builder",
    "decode_value",
    "from_dict",
    "is_partial",
    "partial_parts",
    "record_fields",
    "to_dict",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"

RECORD, PARTIAL, ENUM, DTYPE, TUPLE, REF, NULL = (
    "__submodules__", "__partial__", "__enum__", "__dtype__", "__tuple__", "__ref__", "__null__")
_TAGS = (RECORD, PARTIAL, ENUM, DTYPE, TUPLE, REF, NULL)


def _dtype_type() -> type:
    import torch  # lazily: the spec core does not need torch until a dtype appears

    return torch.dtype


def record_fields(cls: type) -> list[dataclasses.Field[object]]:
    """The `__init__` fields of a Submodules record class (`SpecError` if not a dataclass)."""
    name = cls.__qualname__
    if not dataclasses.is_dataclass(cls):
        raise SpecError(f"{name} is a Submodules subclass but not a @dataclass")
    return [f for f in dataclasses.fields(cls) if f.init]


def is_partial(value: object) -> bool:
    """Whether `value` is a plain `functools.partial` (not a subclass)."""
    return type(value) is functools.partial


def partial_parts(value: object) -> tuple[object, tuple[object, ...], dict[str, object]]:
    """(func, args, keywords) of a `functools.partial`."""
    partial = cast("functools.partial[object]", value)
    return partial.func, partial.args, dict(partial.keywords)


def _is_any_partial(value: object) -> bool:
    return isinstance(value, functools.partial)


def _is_dict(value: object) -> bool:
    return isinstance(value, dict)


def _is_sequence(value: object) -> bool:
    return type(value) is list or type(value) is tuple


def _flatten_partial(value: object,
                     path: str) -> tuple[object, tuple[object, ...], dict[str, object]]:
    """(function, args, keywords) of a partial, nested partials merged as calling them would."""
    if not is_partial(value) or vars(value):
        raise SpecError(f"{where(path)}{short_repr(value)}: only plain functools.partial objects "
                        "(no subclass, no extra attributes) can be written to a spec file")
    func, args, keywords = partial_parts(value)
    if is_partial(func):
        inner_func, inner_args, inner_keywords = _flatten_partial(func, path)
        return inner_func, inner_args + args, {**inner_keywords, **keywords}
    return func, args, keywords


def _encode_record(record: object, path: str) -> dict[str, JSONValue]:
    cls = type(record)
    kinds = slot_protocols(cls)
    fields: dict[str, JSONValue] = {}
    for field in record_fields(cls):
        value: object = getattr(record, field.name)
        at = join_path(path, field.name)
        is_slot = kinds[field.name][0] is not None
        fields[field.name] = _encode_slot(value, at) if is_slot else _encode_value(value, at)
    return {RECORD: reference_of(cls, path=path), "fields": fields}


def _encode_partial(value: object, path: str) -> dict[str, JSONValue]:
    func, args, keywords = _flatten_partial(value, path)
    encoded: dict[str, JSONValue] = {}
    for key, item in keywords.items():
        if not is_identifier(key):
            raise SpecError(f"{where(path)}keyword {key!r} is not an identifier")
        encoded[key] = _encode_value(item, join_path(path, key))
    return {PARTIAL: reference_of(func, path=path),
            "args": [_encode_value(a, f"{path}[{i}]") for i, a in enumerate(args)],
            "kwargs": encoded}


def _encode_slot(value: object, path: str) -> JSONValue:
    if value is None:
        return None
    if isinstance(value, Submodules):
        return _encode_record(value, path)
    if _is_any_partial(value):
        return _encode_partial(value, path)
    return reference_of(value, path=path)


def _check_text(text: str, path: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(f"{where(path)}string {short_repr(text)} holds a lone surrogate, which no "
                        "UTF-8 file can store") from None
    return text


def _encode_value(value: object, path: str) -> JSONValue:
    if value is None or type(value) is bool or type(value) is int:
        return cast("JSONValue", value)
    if type(value) is str:
        return _check_text(value, path)
    if type(value) is float:
        if not math.isfinite(value):
            raise SpecError(f"{where(path)}{value!r} is not finite; spec files hold finite "
                            "numbers only (JSON has no inf/nan)")
        return value
    if isinstance(value, enum.Enum):
        return {ENUM: f"{reference_of(type(value), path=path)}.{value.name}"}
    if isinstance(value, _dtype_type()):
        return {DTYPE: str(value).removeprefix("torch.")}
    if _is_sequence(value):
        items = [_encode_value(v, f"{path}[{i}]")
                 for i, v in enumerate(cast("list[object] | tuple[object, ...]", value))]
        return items if type(value) is list else {TUPLE: items}
    if _is_dict(value):
        result: dict[str, JSONValue] = {}
        for key, item in cast("dict[object, object]", value).items():
            if not isinstance(key, str) or key.startswith("__"):
                raise SpecError(f"{where(path)}dict key {key!r}: keys must be strings not "
                                "starting with '__' (reserved for tags)")
            result[_check_text(key, path)] = _encode_value(item, join_path(path, key))
        return result
    if isinstance(value, Submodules) or _is_any_partial(value):
        return _encode_slot(value, path)
    return {REF: reference_of(value, path=path)}


def _encode_layers(specs: Sequence[object]) -> dict[str, JSONValue]:
    if not specs:
        raise SpecError("to_dict: the list of layer specs is empty; give one spec per layer")
    records: list[dict[str, JSONValue]] = []
    for index, spec in enumerate(specs):
        at = join_path(LAYERS_PATH, str(index))
        if not isinstance(spec, Submodules):
            raise SpecError(f"{where(at)}expected a Submodules record, got {short_repr(spec)}")
        records.append(_encode_record(spec, at))
    groups = layer_groups(records, lambda a, b: a == b)
    return {LAYERS: {range_label(first, last): records[first] for first, last in groups}}


def to_dict(spec: Submodules | Sequence[Submodules]) -> dict[str, JSONValue]:
    """The spec as plain JSON-compatible data (see the module docstring for the format).

    A list or tuple with one spec per layer becomes `{"__layers__": {"0-2": record, "3-60":
    record}}`: equal neighbouring layers are written once, under their 0-based inclusive range.
    Raises `SpecError` naming the slot path and the value for anything a file cannot name.
    """
    if _is_sequence(spec):
        return _encode_layers(cast("Sequence[object]", spec))
    if not isinstance(spec, Submodules):
        raise SpecError(f"to_dict expects a Submodules record or a list of them (one per layer), "
                        f"got {short_repr(spec)}")
    return _encode_record(spec, "")


# ---------------------------------------------------------------------------------------------
# Decoding.


def _as_dict(data: object, path: str, expected: str) -> dict[str, object]:
    if not isinstance(data, dict):
        raise SpecError(f"{where(path)}expected {expected}, got {short_repr(data)}")
    mapping = cast("dict[object, object]", data)
    for key in mapping:
        if not isinstance(key, str):
            raise SpecError(f"{where(path)}key {key!r} is not a string")
    return cast("dict[str, object]", mapping)


def _as_list(data: object, path: str, expected: str) -> list[object]:
    if not isinstance(data, list):
        raise SpecError(f"{where(path)}expected {expected}, got {short_repr(data)}")
    return cast("list[object]", data)


def _check_keys(data: dict[str, object], required: set[str], optional: set[str], path: str) -> None:
    missing = sorted(required - data.keys())
    unknown = sorted(data.keys() - required - optional)
    if missing or unknown:
        problems = [f"missing key(s) {short_repr(missing)}"] if missing else []
        problems += [f"unknown key(s) {short_repr(unknown)}"] if unknown else []
        also = f" and optionally {sorted(optional)}" if optional else ""
        raise SpecError(f"{where(path)}{'; '.join(problems)} (expected the keys "
                        f"{sorted(required)}{also})")


def _tag_of(data: dict[str, object], path: str) -> str | None:
    tags = [key for key in data if key in _TAGS]
    reserved = [key for key in data if key.startswith("__") and key not in _TAGS]
    if reserved:
        raise SpecError(f"{where(path)}unknown tag(s) {short_repr(reserved)}; tags are {list(_TAGS)}")
    if len(tags) > 1:
        raise SpecError(f"{where(path)}an object carries several tags {short_repr(tags)}")
    return tags[0] if tags else None


class _Decoder:
    def __init__(self, allow: Sequence[str]) -> None:
        self.allow = normalize_allow(allow)

    def record(self, data: object, path: str) -> Submodules:
        mapping = _as_dict(data, path,
                           "a record {'__submodules__': 'module:Class', 'fields': {...}}")
        if RECORD not in mapping:
            raise SpecError(f"{where(path)}a record needs '{RECORD}': 'module:Class', got keys "
                            f"{short_repr(sorted(mapping))}")
        _check_keys(mapping, {RECORD, "fields"}, set(), path)
        cls = resolve_reference(mapping[RECORD], allow=self.allow, path=path)
        if not isinstance(cls, type) or not issubclass(cls, Submodules):
            raise SpecError(f"{where(path)}{short_repr(mapping[RECORD])} is not a Submodules record class")
        fields = _as_dict(mapping["fields"], join_path(path, "fields"), "a mapping of slot names")
        init_fields = {f.name: f for f in record_fields(cls)}
        unknown = sorted(fields.keys() - init_fields.keys())
        if unknown:
            raise SpecError(f"{where(path)}{cls.__qualname__} has no field(s) {short_repr(unknown)}; its "
                            f"fields are {list(init_fields)}")
        missing = [name for name, f in init_fields.items() if name not in fields and
                   f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise SpecError(f"{where(path)}{cls.__qualname__} is missing required field(s) "
                            f"{missing}")
        kinds = slot_protocols(cls)
        values: dict[str, object] = {}
        for name, item in fields.items():
            decode = self.slot if kinds[name][0] is not None else self.value
            values[name] = decode(item, join_path(path, name))
        return _construct(cls, values, path)

    def slot(self, data: object, path: str) -> object:
        """A builder slot: a name string, a partial, a record, or null."""
        if data is None:
            return None
        if isinstance(data, str):
            return resolve_builder(data, allow=self.allow, path=path)
        if _is_dict(data):
            mapping = _as_dict(data, path, "")
            if _tag_of(mapping, path) in (RECORD, PARTIAL, REF, NULL):
                return self.value(mapping, path)
        raise SpecError(f"{where(path)}a slot takes a builder 'package.module:Name', a partial "
                        f"{{'{PARTIAL}': ...}}, a record {{'{RECORD}': ...}} or null; got "
                        f"{short_repr(data)}")

    def partial(self, data: dict[str, object], path: str) -> object:
        _check_keys(data, {PARTIAL}, {"args", "kwargs"}, path)
        func = resolve_builder(data[PARTIAL], allow=self.allow, path=path)
        args = _as_list(data.get("args", []), path, "'args' to be a list")
        kwargs = _as_dict(data.get("kwargs", {}), path, "'kwargs' to be a mapping")
        for key in kwargs:
            if not is_identifier(key):
                raise SpecError(f"{where(path)}keyword {key!r} is not an identifier")
        decoded_args = [self.value(a, f"{path}[{i}]") for i, a in enumerate(args)]
        decoded_kwargs = {k: self.value(v, join_path(path, k)) for k, v in kwargs.items()}
        builder = cast("Callable[..., object]", func)
        return functools.partial(builder, *decoded_args, **decoded_kwargs)

    def value(self, data: object, path: str) -> object:
        """A keyword value: a JSON value or a tagged object."""
        if data is None or type(data) is bool or type(data) is int:
            return data
        if type(data) is str:
            return _check_text(data, path)
        if type(data) is float:
            if not math.isfinite(data):
                raise SpecError(f"{where(path)}{data!r} is not finite; use a finite number")
            return data
        if type(data) is list:
            return [self.value(v, f"{path}[{i}]") for i, v in enumerate(cast("list[object]", data))]
        if not _is_dict(data):
            raise SpecError(f"{where(path)}{short_repr(data)} (a {type(data).__qualname__}) is "
                            "not a JSON value")
        mapping = _as_dict(data, path, "")
        tag = _tag_of(mapping, path)
        if tag is None:
            return {_check_text(k, path): self.value(v, join_path(path, k))
                    for k, v in mapping.items()}
        if tag == RECORD:
            return self.record(mapping, path)
        if tag == PARTIAL:
            return self.partial(mapping, path)
        _check_keys(mapping, {tag}, set(), path)
        content = mapping[tag]
        if tag == NULL:
            if content is not True:
                raise SpecError(f"{where(path)}write null as {{'{NULL}': true}}")
            return None
        if tag == TUPLE:
            items = _as_list(content, path, f"'{TUPLE}' to hold a list")
            return tuple(self.value(v, f"{path}[{i}]") for i, v in enumerate(items))
        if tag == REF:
            return resolve_builder(content, allow=self.allow, path=path)
        if tag == DTYPE:
            return _decode_dtype(content, path)
        return self.enum(content, path)

    def enum(self, content: object, path: str) -> object:
        if not isinstance(content, str) or "." not in content.partition(":")[2]:
            raise SpecError(f"{where(path)}an enum is written 'package.module:Class.member', got "
                            f"{short_repr(content)}")
        class_name, _, member = content.rpartition(".")
        cls = resolve_reference(class_name, allow=self.allow, path=path)
        if not isinstance(cls, type) or not issubclass(cls, enum.Enum):
            raise SpecError(f"{where(path)}{short_repr(class_name)} is not an Enum class")
        members = dict(cls.__members__)
        if member not in members:
            raise SpecError(f"{where(path)}{cls.__qualname__} has no member {short_repr(member)}; members: "
                            f"{list(members)}")
        return members[member]


def _decode_dtype(content: object, path: str) -> object:
    import torch

    # vars(), not getattr(): torch imports submodules lazily on attribute access, and a name
    # such as "onnx" must be refused without importing anything.
    found: object = vars(torch).get(content) if isinstance(content, str) and \
        is_identifier(content) and not content.startswith("_") else None
    if not isinstance(found, torch.dtype):
        raise SpecError(f"{where(path)}{short_repr(content)} is not a torch dtype name (e.g. "
                        "'bfloat16', 'float32')")
    return found


def _construct(cls: type[Submodules], values: dict[str, object], path: str) -> Submodules:
    """`cls(**values)`: runs the conformance check of every slot; any failure is a SpecError."""
    try:
        return cls(**values)
    except SpecError as error:
        raise SpecError(f"{where(path)}{error}") from error
    except Exception as error:  # a record's own __post_init__ rules (ValueError, TypeError...)
        raise SpecError(f"{where(path)}building {cls.__qualname__} failed: "
                        f"{type(error).__name__}: {error}") from error


def _decode_layers(decoder: _Decoder, mapping: dict[str, object]) -> list[Submodules]:
    _check_keys(mapping, {LAYERS}, set(), "")
    groups = _as_dict(mapping[LAYERS], LAYERS_PATH,
                      "a mapping from layer ranges ('0', '3-60') to records")
    ranges: list[tuple[int, int, str]] = []
    for key in groups:
        parsed = parse_layer_range(key)
        if parsed is None:
            raise SpecError(f"{where(LAYERS_PATH)}key {key!r} is not a layer index or range; "
                            "write '3' or '3-60' (0-based, inclusive)")
        ranges.append((*parsed, key))
    if not ranges:
        raise SpecError(f"{where(LAYERS_PATH)}no layers; give at least one range, e.g. '0-3'")
    ranges.sort()
    specs: list[Submodules] = []
    for first, last, key in ranges:
        if first != len(specs):
            problem = (f"layer(s) {range_label(len(specs), first - 1)} are missing"
                       if first > len(specs) else f"layer {first} appears twice")
            raise SpecError(f"{where(join_path(LAYERS_PATH, key))}{problem}; the ranges must "
                            "cover 0..N-1 once each")
        spec = decoder.record(groups[key], join_path(LAYERS_PATH, key))
        specs.extend([spec] * (last - first + 1))
    return specs


def from_dict(data: object, *,
              allow: Sequence[str] = DEFAULT_ALLOW) -> Submodules | list[Submodules]:
    """The spec that `data` (as written by `to_dict`) describes, validated slot by slot.

    Data with `"__layers__"` gives a list with one spec per layer (layers of one range share
    one record object). Only modules under the `allow` prefixes are imported (see
    `protoformer.spec.names`). A field with a default may be left out of "fields" (so files
    stay valid when a record gains an optional slot); a required one may not. Any problem,
    malformed data included, raises `SpecError` naming the path in the spec.
    `to_dict(from_dict(to_dict(s))) == to_dict(s)`, and the rebuilt spec is `spec_equal` to
    `s` (the very same classes and functions).
    """
    decoder = _Decoder(allow)
    try:
        if _is_dict(data) and LAYERS in cast("dict[object, object]", data):
            return _decode_layers(decoder, _as_dict(data, "", "a mapping"))
        return decoder.record(data, "")
    except RecursionError:
        raise SpecError("spec root: the data is nested too deeply to be a spec") from None


def decode_builder(data: object, *, allow: Sequence[str] = DEFAULT_ALLOW, path: str = "") -> object:
    """One slot value from data: a builder name, a partial, a record or null."""
    return _Decoder(allow).slot(data, path)


def decode_value(data: object, *, allow: Sequence[str] = DEFAULT_ALLOW, path: str = "") -> object:
    """One keyword value from data: a JSON value or a tagged object (`SpecError` if bad)."""
    return _Decoder(allow).value(data, path)
