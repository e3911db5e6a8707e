"""A layer spec given as data: a spec file, `PATH=VALUE` overrides and an import allowlist.

What `--spec FILE`, `--set PATH=VALUE` and `--allow PREFIX` mean, for every command that
builds a model (`inspect`, `train`), and the spec a training checkpoint stores so a resumed
run or `generate` rebuilds the very same model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from protoformer.backends import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.presets import Preset
from protoformer.spec import DEFAULT_ALLOW, SpecError, apply_overrides, from_dict, load_spec
from protoformer.spec.serialize import JSONValue
from protoformer.transformer.layer import TransformerLayerSubmodules

__all__ = ["allow_list", "layer_spec_from_data", "stored_layer_spec"]


def allow_list(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The module prefixes builders may be imported from: the defaults plus `extra`."""
    return (*DEFAULT_ALLOW, *(str(prefix) for prefix in extra))


def _layer_spec(spec: object, source: str) -> TransformerLayerSubmodules:
    if not isinstance(spec, TransformerLayerSubmodules):
        raise SpecError(f"{source}: holds a {type(spec).__qualname__}; a model's layer spec "
                        "must be a TransformerLayerSubmodules (a whole layer's spec)")
    return spec


def layer_spec_from_data(
    preset: Preset,
    backend: BackendSpecProvider,
    *,
    spec_file: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    allow: Sequence[str] = (),
    config: TransformerConfig | None = None,
) -> TransformerLayerSubmodules | None:
    """The layer spec a spec file and overrides describe, or None when neither is given.

    Overrides without a file edit the preset's own recipe (built with `backend` for `config`,
    default the preset's config). Builders are imported only from modules under
    `DEFAULT_ALLOW` and the `allow` prefixes. Every slot passes the runtime conformance check
    (a `SpecError` names the slot); anything but a transformer layer's spec is refused.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides={overrides!r}: pass a sequence of 'PATH=VALUE' strings")
    if spec_file is None and not overrides:
        return None
    prefixes = allow_list(allow)
    if spec_file is not None:
        spec: object = load_spec(spec_file, allow=prefixes)
        source = str(spec_file)
    else:
        base_config = config if config is not None else preset.config()
        spec = preset.layer_spec(backend, base_config)
        source = f"preset {preset.name!r}"
    layer_spec = _layer_spec(spec, source)
    if overrides:
        layer_spec = apply_overrides(layer_spec, list(overrides), allow=prefixes)
    return layer_spec


def stored_layer_spec(data: JSONValue, *, allow: Sequence[str] = (),
                      where: str = "checkpoint") -> TransformerLayerSubmodules:
    """The layer spec `protoformer.spec.to_dict` stored (in a checkpoint), rebuilt and checked."""
    return _layer_spec(from_dict(data, allow=allow_list(allow)), where)
