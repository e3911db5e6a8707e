"""Lists of per-layer specs: grouping equal neighbours and naming layers by index or range.

A model may take one spec per layer (dense layers first, then MoE; sliding and global
attention alternating). Files, diffs, overrides and `inspect` name those layers the same
way: `layers.3` (one layer, 0-based), `layers.3-60` (an inclusive range) and, in overrides,
`layers.*` (every layer). Equal neighbouring specs are shown, and written to files, as one
group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["LAYERS", "LAYERS_PATH", "layer_groups", "parse_layer_range", "range_label"]

LAYERS = "__layers__"
"""The key of a spec file that holds one spec per layer: `{"__layers__": {"0-2": record, ...}}`."""

LAYERS_PATH = "layers"
"""The first segment of a path into a list of layer specs (`layers.3.mlp.linear_fc1`)."""

_T = TypeVar("_T")
_RANGE = re.compile(r"(0|[1-9][0-9]*)(?:-(0|[1-9][0-9]*))?")


def layer_groups(items: Sequence[_T], same: Callable[[_T, _T], bool]) -> list[tuple[int, int]]:
    """(first, last) index of each run of neighbours that are `same` (last inclusive)."""
    groups: list[tuple[int, int]] = []
    for index, item in enumerate(items):
        if groups and same(items[groups[-1][0]], item):
            groups[-1] = (groups[-1][0], index)
        else:
            groups.append((index, index))
    return groups


def range_label(first: int, last: int) -> str:
    """"3" for one layer, "3-60" for a range."""
    return str(first) if first == last else f"{first}-{last}"


def parse_layer_range(text: str) -> tuple[int, int] | None:
    """(first, last) from "3" or "3-60" (0-based, inclusive), or None if `text` is neither or
    the range runs backwards."""
    match = _RANGE.fullmatch(text)
    if match is None:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    return (first, last) if first <= last else None
