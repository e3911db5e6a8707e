"""A small TOML emitter for the data `to_dict` produces (the standard library only reads TOML).

It writes nested mappings as `[dotted.table]` sections and everything inside a list, plus the
one-key tagged objects (`{__enum__ = ...}`), as inline values. TOML has no null, so None is
written as the tagged object `{ __null__ = true }`, which `from_dict` reads back as None.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from protoformer.spec.check import SpecError

if TYPE_CHECKING:
    from protoformer.spec.serialize import JSONValue

__all__ = ["toml_document"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}
_INT64 = (-(2**63), 2**63 - 1)


def _string(text: str) -> str:
    out: list[str] = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        elif 0xD800 <= ord(char) <= 0xDFFF:
            raise SpecError(f"string {text!r} holds a lone surrogate, which TOML cannot store")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _inline(value: JSONValue) -> str:
    if value is None:
        return "{ __null__ = true }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise SpecError(f"integer {value} does not fit TOML's 64-bit integers; use JSON")
        return str(value)
    if isinstance(value, float):
        return repr(value)  # finite (to_dict refuses inf/nan); repr round-trips exactly
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if not value:
        return "{}"
    return "{ " + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + " }"


def _is_section(value: JSONValue) -> bool:
    """Whether a value becomes its own `[table]`: a non-empty mapping other than a one-key tag."""
    if not isinstance(value, dict) or not value:
        return False
    return not (len(value) == 1 and next(iter(value)).startswith("__"))


def _table(table: dict[str, JSONValue], keys: list[str], lines: list[str]) -> None:
    inline = [(k, v) for k, v in table.items() if not _is_section(v)]
    sections = [(k, v) for k, v in table.items() if _is_section(v)]
    if keys and (inline or not sections):
        lines.extend(["", "[" + ".".join(_key(k) for k in keys) + "]"])
    lines.extend(f"{_key(k)} = {_inline(v)}" for k, v in inline)
    for key, value in sections:
        assert isinstance(value, dict)
        _table(value, [*keys, key], lines)


def toml_document(data: dict[str, JSONValue]) -> str:
    """`data` as the text of a TOML document that `tomllib.loads` reads back to equal data.

    None anywhere comes back as `{"__null__": True}` (TOML has no null); `from_dict` treats
    both the same.
    """
    lines: list[str] = []
    _table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"
