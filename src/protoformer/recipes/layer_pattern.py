"""Per-layer spec lists from a layer pattern (dense/MoE, sliding/global attention, ...).

A block takes one layer spec per layer (`TransformerBlock`). Recipes describe which layers
differ by a pattern: `layer_pattern_from_freq` reads Megatron-Core's `moe_layer_freq` form
(an int N: every N-th layer starting at layer 0; or a 0/1 list, one entry per layer) plus
DeepSeek's "first k dense", and `layer_specs_from_pattern` turns a pattern into the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from protoformer.spec import Submodules

__all__ = ["layer_pattern_from_freq", "layer_specs_from_pattern"]

_SpecT = TypeVar("_SpecT", bound=Submodules)


def layer_pattern_from_freq(freq: int | Sequence[int] | Sequence[bool], num_layers: int, *,
                            first_k_dense: int = 0, field: str = "moe_layer_freq") -> list[bool]:
    """Which of `num_layers` layers are the special kind (e.g. MoE), as Megatron-Core reads it.

    `freq` an int N marks layers 0, N, 2N, ... (N=1: every layer); a list of 0/1 (or bools)
    with one entry per layer marks the entries that are 1. `first_k_dense` then unmarks the
    first k layers (DeepSeek's `first_k_dense_replace`). Bad values raise `ValueError` naming
    `field`.
    """
    if type(num_layers) is not int or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be a positive int")
    if type(first_k_dense) is not int or not 0 <= first_k_dense <= num_layers:
        raise ValueError(f"first_k_dense={first_k_dense!r} must be an int in 0..{num_layers} "
                         "(the number of leading layers kept dense)")
    if type(freq) is int:
        if freq < 1:
            raise ValueError(f"{field}={freq}: an int frequency must be >= 1 (1 = every layer, "
                             "N = every N-th layer starting at layer 0)")
        pattern = [index % freq == 0 for index in range(num_layers)]
    elif isinstance(freq, (list, tuple)):
        entries: list[object] = list(freq)
        if len(entries) != num_layers:
            raise ValueError(f"{field} has {len(entries)} entries for num_layers={num_layers}; "
                             "a pattern needs one 0/1 entry per layer")
        for index, entry in enumerate(entries):
            if entry not in (0, 1) or type(entry) not in (int, bool):
                raise ValueError(f"{field}[{index}]={entry!r}; pattern entries are 0 or 1")
        pattern = [entry == 1 for entry in entries]
    else:
        raise ValueError(f"{field}={freq!r}: expected an int frequency or a list of 0/1 with "
                         "one entry per layer")
    return [marked and index >= first_k_dense for index, marked in enumerate(pattern)]


def layer_specs_from_pattern(pattern: Sequence[int] | Sequence[bool],
                             choices: Sequence[_SpecT]) -> list[_SpecT]:
    """One spec per layer: layer i gets `choices[pattern[i]]`.

    With a bool pattern, `choices` is `(spec_for_False, spec_for_True)`, e.g.
    `layer_specs_from_pattern(layer_pattern_from_freq(config.moe_layer_freq, n), (dense, moe))`.
    An entry outside `0..len(choices)-1` raises `ValueError` naming the layer.
    """
    if not choices:
        raise ValueError("layer_specs_from_pattern: choices is empty; give one spec per kind")
    specs: list[_SpecT] = []
    for index, entry in enumerate(pattern):
        if type(entry) not in (int, bool) or not 0 <= entry < len(choices):
            raise ValueError(f"layer_specs_from_pattern: pattern[{index}]={entry!r} does not "
                             f"pick one of the {len(choices)} choices (0..{len(choices) - 1})")
        specs.append(choices[int(entry)])
    return specs
