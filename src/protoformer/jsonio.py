"""Bounded reading of the JSON files protoformer parses (state.json, config.json, indexes, specs).

A file comes from the user or from the disk of a run that may have been damaged, so it is
read with limits: at most `max_bytes` bytes (read up to the limit, so a FIFO or `/dev/zero`
cannot make us read forever), nested at most `max_depth` levels (a 10^5-deep document is one
line, not a `RecursionError`), and every message quotes at most a short prefix of what it
found. Callers turn `JSONFileError` into their own error type (`CheckpointError`,
`HFConversionError`, `SpecError`) so that the command line prints it as one line.

This module depends on nothing else in protoformer, so every layer may use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "JSONFileError",
    "clip",
    "json_depth_problem",
    "loads_bounded",
    "read_bounded_text",
    "read_json_file",
]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Largest JSON file read by default (64 MiB); a checkpoint's state.json is far smaller."""

DEFAULT_MAX_DEPTH = 100
"""Deepest nesting accepted by default; configs and states nest a handful of levels."""

SHOWN_CHARACTERS = 120
"""How much of a user value a message quotes."""


class JSONFileError(ValueError):
    """A JSON file (or text) that is too large, too deep, not UTF-8 or not JSON."""


def clip(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """`text` cut to `limit` characters (ending in "..."), for quoting user values in messages."""
    return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def read_bounded_text(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                      what: str = "file") -> str:
    """The UTF-8 text of `path`, refusing more than `max_bytes` bytes (`JSONFileError`).

    A missing or unreadable file raises `OSError` as usual.
    """
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONFileError(f"{path}: the {what} is larger than {_size(max_bytes)}; it is not "
                            f"a {what} protoformer wrote or can read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JSONFileError(f"{path}: not a UTF-8 text file (byte {error.start}); the {what} is "
                            "corrupt") from None


def json_depth_problem(value: object, max_depth: int) -> str | None:
    """Why `value` (parsed JSON) nests too deeply, or None; walks without recursion."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: list[object] = list(item.values())  # pyright: ignore[reportUnknownArgumentType]  # parsed JSON
        elif isinstance(item, list):
            children = list(item)  # pyright: ignore[reportUnknownArgumentType]  # parsed JSON
        else:
            continue
        if depth > max_depth:
            return f"nested more than {max_depth} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def loads_bounded(text: str, *, max_depth: int = DEFAULT_MAX_DEPTH, source: str = "<text>",
                  object_pairs_hook: Callable[[list[tuple[str, object]]], object] | None = None,
                  ) -> object:
    """`json.loads(text)` with a depth limit; any problem is one-line `JSONFileError`."""
    try:
        value: object = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise JSONFileError(f"{source}: nested too deeply to be read (more than "
                            f"{max_depth} levels are refused)") from None
    except json.JSONDecodeError as error:
        raise JSONFileError(f"{source}: not a valid JSON file ({clip(error.msg, 80)} at line "
                            f"{error.lineno} column {error.colno})") from None
    problem = json_depth_problem(value, max_depth)
    if problem is not None:
        raise JSONFileError(f"{source}: {problem}; refused")
    return value


def read_json_file(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_depth: int = DEFAULT_MAX_DEPTH, what: str = "JSON file") -> object:
    """The parsed JSON of `path`, within `max_bytes` and `max_depth` (`JSONFileError`)."""
    text = read_bounded_text(path, max_bytes=max_bytes, what=what)
    return loads_bounded(text, max_depth=max_depth, source=str(Path(path)))


def _size(count: int) -> str:
    return f"{count // (1024 * 1024)} MiB" if count >= 1024 * 1024 else f"{count} bytes"
