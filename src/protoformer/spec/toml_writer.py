"""TOML text for the data `to_dict` produces, written by tomli-w (the standard library only reads TOML).

TOML has no null, so None is written as the tagged object `{ __null__ = true }`, which
`from_dict` reads back as None. What tomli-w would write but no TOML reader accepts is
refused first with a `SpecError`: integers beyond 64 bits and strings holding a lone
surrogate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tomli_w

from protoformer.spec.check import SpecError

if TYPE_CHECKING:
    from protoformer.spec.serialize import JSONValue

__all__ = ["toml_document"]

_INT64 = (-(2**63), 2**63 - 1)
_NULL: dict[str, object] = {"__null__": True}


def _storable(value: JSONValue) -> object:
    """`value` with None spelled as the null tag, checked for what TOML cannot hold."""
    if value is None:
        return dict(_NULL)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise SpecError(f"integer {value} does not fit TOML's 64-bit integers; use JSON")
        return value
    if isinstance(value, str):
        if any(0xD800 <= ord(char) <= 0xDFFF for char in value):
            raise SpecError(f"string {value!r} holds a lone surrogate, which TOML cannot store")
        return value
    if isinstance(value, list):
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        for key in value:
            _storable(key)
        return {key: _storable(item) for key, item in value.items()}
    return value  # a float: finite (to_dict refuses inf/nan); tomli-w round-trips it exactly


def toml_document(data: dict[str, JSONValue]) -> str:
    """`data` as the text of a TOML document that `tomllib.loads` reads back to equal data.

    None anywhere comes back as `{"__null__": True}` (TOML has no null); `from_dict` treats
    both the same.
    """
    return tomli_w.dumps({key: _storable(value) for key, value in data.items()})
