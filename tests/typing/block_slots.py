"""Typing test: a block and a model take one layer spec or a sequence of layer specs, only those.

Checked by pyright and mypy (not run). Each line that must be rejected carries the expected
error code for both checkers; with unused-ignore reporting on, a checker that stops
rejecting the line fails the typing test.
"""

from __future__ import annotations

from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec, layer_specs_from_pattern, mlp_spec
from protoformer.transformer.block import LayerSpecs, TransformerBlock
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLPSubmodules


def one_spec_or_one_per_layer(backend: BackendSpecProvider, config: TransformerConfig) -> None:
    spec = gpt_layer_spec(backend, config)
    TransformerBlock(config, spec)
    TransformerBlock(config, [spec, spec])
    TransformerBlock(config, (spec, spec))
    GPTModel(config, [spec] * config.num_layers, 32, 16)
    specs: list[TransformerLayerSubmodules] = layer_specs_from_pattern([0, 1], (spec, spec))
    TransformerBlock(config, specs)
    declared: LayerSpecs = specs
    GPTModel(config, declared, 32, 16)


def other_records_are_not_layer_specs(backend: BackendSpecProvider,
                                      config: TransformerConfig) -> None:
    mlp = mlp_spec(backend, config)
    mlps: list[MLPSubmodules] = [mlp, mlp]
    TransformerBlock(config, mlp)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    TransformerBlock(config, mlps)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    GPTModel(config, mlps, 32, 16)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    declared: LayerSpecs = mlps  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    pattern: list[TransformerLayerSubmodules] = layer_specs_from_pattern([0], (mlp,))  # type: ignore[arg-type]  # pyright: ignore[reportAssignmentType]
    del declared, pattern
