"""A layer spec (or one per layer) given as data: a spec file, `PATH=VALUE` overrides and an import allowlist.

What `--spec FILE`, `--set PATH=VALUE` and `--allow PREFIX` mean, for every command that
builds a model (`inspect`, `train`), and the spec a training checkpoint stores so a resumed
run or `generate` rebuilds the very same model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeAlias, cast

from protoformer.backends import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.presets import Preset
from protoformer.spec import DEFAULT_ALLOW, SpecError, apply_overrides, from_dict, load_spec
from protoformer.spec.layers import LAYERS_PATH
from protoformer.spec.serialize import JSONValue
from protoformer.transformer.layer import TransformerLayerSubmodules

__all__ = ["LayerSpecList", "allow_list", "layer_spec_from_data", "stored_layer_spec"]

LayerSpecList: TypeAlias = "TransformerLayerSubmodules | list[TransformerLayerSubmodules]"
"""One layer spec for every layer, or a list with one per layer (what a model takes)."""


def allow_list(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The module prefixes builders may be imported from: the defaults plus `extra`."""
    return (*DEFAULT_ALLOW, *(str(prefix) for prefix in extra))


def _layer_spec(spec: object, source: str, num_layers: int | None) -> LayerSpecList:
    """A whole layer's spec, or a list with one per layer (of `num_layers`, when known)."""
    if isinstance(spec, list):
        specs = cast("list[object]", spec)
        for index, item in enumerate(specs):
            if not isinstance(item, TransformerLayerSubmodules):
                raise SpecError(f"{source}: layer {index} holds a {type(item).__qualname__}; a "
                                "model's layer specs must be TransformerLayerSubmodules records")
        if num_layers is not None and len(specs) != num_layers:
            raise SpecError(f"{source}: holds {len(specs)} layer spec(s) but the model has "
                            f"num_layers={num_layers}; give one spec per layer (or one spec "
                            "for every layer)")
        return [item for item in specs if isinstance(item, TransformerLayerSubmodules)]
    if not isinstance(spec, TransformerLayerSubmodules):
        raise SpecError(f"{source}: holds a {type(spec).__qualname__}; a model's layer spec "
                        "must be a TransformerLayerSubmodules (a whole layer's spec) or a list "
                        "of them, one per layer")
    return spec


def _names_layers(assignment: str) -> bool:
    return assignment.partition("=")[0].strip().split(".")[0] == LAYERS_PATH


def layer_spec_from_data(
    preset: Preset,
    backend: BackendSpecProvider,
    *,
    spec_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    allow: Sequence[str] = (),
    config: TransformerConfig | None = None,
) -> LayerSpecList | None:
    """The layer spec(s) a spec file and overrides describe, or None when neither is given.

    Overrides without a file edit the preset's own recipe (built with `backend` for `config`,
    default the preset's config). An override of some layers (`layers.3.mlp...`,
    `layers.3-60...`, `layers.*...`) turns one spec for every layer into a list with one per
    layer first. Builders are imported only from modules under `DEFAULT_ALLOW` and the `allow`
    prefixes. Every slot passes the runtime conformance check (a `SpecError` names the slot);
    anything but a transformer layer's spec (or a list of `num_layers` of them) is refused.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides={overrides!r}: pass a sequence of 'PATH=VALUE' strings")
    if spec_file is None and not overrides:
        return None
    prefixes = allow_list(allow)
    base_config = config if config is not None else preset.config()
    if spec_file is not None:
        spec: object = load_spec(spec_file, allow=prefixes)
        source = str(spec_file)
    else:
        spec = preset.layer_spec(backend, base_config)
        source = f"preset {preset.name!r}"
    layer_spec = _layer_spec(spec, source, base_config.num_layers)
    if isinstance(layer_spec, TransformerLayerSubmodules) and any(map(_names_layers, overrides)):
        layer_spec = [layer_spec] * base_config.num_layers
    if overrides:
        layer_spec = apply_overrides(layer_spec, list(overrides), allow=prefixes)
    return layer_spec


def stored_layer_spec(data: JSONValue, *, allow: Sequence[str] = (), where: str = "checkpoint",
                      num_layers: int | None = None) -> LayerSpecList:
    """The layer spec (or per-layer list) `protoformer.spec.to_dict` stored (in a checkpoint),
    rebuilt and checked.

    A refusal names `where` (the checkpoint's state.json), so the user knows the spec came
    from the checkpoint and not from a `--spec` file of theirs.
    """
    try:
        spec = from_dict(data, allow=allow_list(allow))
    except SpecError as error:
        raise SpecError(f"{where} (the layer spec stored in the checkpoint): {error}") from error
    return _layer_spec(spec, where, num_layers)
