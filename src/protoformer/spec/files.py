"""Spec files: JSON, TOML and (with PyYAML) YAML text for `to_dict`/`from_dict` data.

JSON is written with two-space indentation; TOML by tomli-w (`toml_writer`; the
standard library only reads TOML, with `tomllib` on Python 3.11+, or the `tomli` package on
3.10); YAML with `yaml.safe_dump`/`yaml.safe_load` when PyYAML is installed. A malformed file
raises `SpecError` naming the file; a missing file raises `OSError`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from protoformer.jsonio import JSONFileError, json_depth_problem, loads_bounded, read_bounded_text
from protoformer.spec.check import SpecError, clip
from protoformer.spec.names import DEFAULT_ALLOW
from protoformer.spec.serialize import from_dict, to_dict
from protoformer.spec.submodules import Submodules
from protoformer.spec.toml_writer import toml_document

__all__ = ["SpecFormat", "dumps_spec", "load_spec", "loads_spec", "save_spec"]

SpecFormat = Literal["json", "toml", "yaml"]
MAX_SPEC_BYTES = 16 * 1024 * 1024
"""Largest spec file read (16 MiB; a whole model's spec is a few KiB)."""
MAX_SPEC_DEPTH = 256
"""Deepest nesting of a spec file's data (each nested record adds about four levels)."""
_SUFFIXES: dict[str, SpecFormat] = {
    ".json": "json", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}


def _check_format(format: str) -> None:
    if format not in ("json", "toml", "yaml"):
        raise SpecError(f"format={format!r}: spec files are 'json', 'toml' or 'yaml'")


def _format_of(path: Path, format: SpecFormat | None) -> SpecFormat:
    if format is not None:
        _check_format(format)
        return format
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise SpecError(f"{path}: cannot tell the spec format from the suffix {path.suffix!r}; "
                        f"use one of {sorted(_SUFFIXES)} or pass format=")
    return found


def _yaml() -> types.ModuleType:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        raise SpecError("YAML spec files need PyYAML (pip install pyyaml); or use JSON or TOML")\
            from None


def dumps_spec(spec: Submodules | Sequence[Submodules], format: SpecFormat = "json") -> str:
    """The text of a spec file in `format` ("json", "toml" or "yaml"); a list of per-layer specs
    is written as groups of equal neighbouring layers (see `protoformer.spec.serialize`)."""
    _check_format(format)
    data = to_dict(spec)
    if format == "json":
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    if format == "toml":
        return toml_document(data)
    text: str = _yaml().safe_dump(data, sort_keys=False)
    return text


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise SpecError(f"duplicate key {clip(repr(key))} in a JSON object")
        result[key] = value
    return result


def _parse_toml(text: str) -> object:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    try:
        tomli = importlib.import_module("tomli")
    except ImportError:
        raise SpecError("reading TOML spec files needs Python 3.11+ (tomllib) or the tomli "
                        "package; or use a JSON spec file") from None
    parsed: object = tomli.loads(text)
    return parsed


def loads_spec(text: str, format: SpecFormat = "json", *,
               allow: Sequence[str] = DEFAULT_ALLOW,
               source: str = "<string>") -> Submodules | list[Submodules]:
    """The spec (or list of per-layer specs) in the text of a spec file; `SpecError` (naming
    `source`) on any problem."""
    _check_format(format)
    try:
        if format == "json":
            data: object = loads_bounded(text, max_depth=MAX_SPEC_DEPTH, source=source,
                                         object_pairs_hook=_no_duplicates)
        elif format == "toml":
            data = _parse_toml(text)
        else:
            data = _yaml().safe_load(text)
    except JSONFileError as error:
        raise SpecError(str(error)) from None
    except SpecError as error:
        raise SpecError(f"{source}: {error}") from error
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply to be a spec") from None
    except Exception as error:  # each parser has its own error type; all mean "malformed file"
        raise SpecError(f"{source}: not a valid {format.upper()} file: "
                        f"{clip(str(error), 300)}") from error
    problem = json_depth_problem(data, MAX_SPEC_DEPTH)
    if problem is not None:
        raise SpecError(f"{source}: {problem}; a spec nests a few levels per record")
    try:
        return from_dict(data, allow=allow)
    except SpecError as error:
        raise SpecError(f"{source}: {error}") from error


def save_spec(spec: Submodules | Sequence[Submodules], path: str | os.PathLike[str], *,
              format: SpecFormat | None = None) -> Path:
    """Write `spec` (or a list of per-layer specs) to `path` (.json, .toml, .yaml/.yml, or
    `format`); returns the path."""
    target = Path(path)
    text = dumps_spec(spec, _format_of(target, format))
    target.write_text(text, encoding="utf-8")
    return target


def load_spec(path: str | os.PathLike[str], *, allow: Sequence[str] = DEFAULT_ALLOW,
              format: SpecFormat | None = None) -> Submodules | list[Submodules]:
    """Read a spec file (.json, .toml, .yaml/.yml, or `format`), importing only `allow`ed modules.

    A file written from a list of per-layer specs gives that list back.
    A missing or unreadable file raises `OSError`; anything wrong inside it, `SpecError`.
    """
    source = Path(path)
    fmt = _format_of(source, format)
    try:
        text = read_bounded_text(source, max_bytes=MAX_SPEC_BYTES, what="spec file")
    except JSONFileError as error:
        raise SpecError(str(error)) from None
    return loads_spec(text, fmt, allow=allow, source=str(source))
