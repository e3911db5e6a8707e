"""A stack of transformer layers with the final norm of a pre-norm model."""

from __future__ import annotations

import contextlib
from collections.abc import Container, Sequence
from contextlib import AbstractContextManager
from typing import TypeAlias

import torch
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.initialization import draw_init_seed, fork_init_rng
from protoformer.parallel.groups import ProcessGroups
from protoformer.spec import apply_module
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from protoformer.transformer.norm import IdentityOp, LayerNormInterface

__all__ = ["LayerSpecs", "TransformerBlock", "built_on", "per_layer_specs"]

# One spec for every layer, or exactly one per layer (Megatron-Core's
# `TransformerBlockSubmodules(layer_specs=[...])`).
LayerSpecs: TypeAlias = "TransformerLayerSubmodules | Sequence[TransformerLayerSubmodules]"


def per_layer_specs(layer_spec: LayerSpecs, num_layers: int, *,
                    owner: str = "TransformerBlock") -> list[TransformerLayerSubmodules]:
    """The spec of each of `num_layers` layers: one spec repeated, or a checked list.

    Raises `TypeError` for anything but a `TransformerLayerSubmodules` or a list/tuple of them
    (naming the index of the first wrong element), `ValueError` for a list of the wrong length.
    """
    if isinstance(layer_spec, TransformerLayerSubmodules):
        return [layer_spec] * num_layers
    if not isinstance(layer_spec, (list, tuple)):
        raise TypeError(f"{owner} expects layer_spec=TransformerLayerSubmodules(...) or a list "
                        f"with one per layer, got {type(layer_spec).__qualname__}")
    specs: list[object] = list(layer_spec)
    for index, spec in enumerate(specs):
        if not isinstance(spec, TransformerLayerSubmodules):
            raise TypeError(f"{owner}: layer_spec[{index}] is a {type(spec).__qualname__}; every "
                            "element must be a TransformerLayerSubmodules (one per layer)")
    if len(specs) != num_layers:
        raise ValueError(f"{owner}: got {len(specs)} layer spec(s) for config.num_layers="
                         f"{num_layers}; pass exactly one spec per layer, or a single spec for "
                         "every layer")
    return [spec for spec in specs if isinstance(spec, TransformerLayerSubmodules)]


def built_on(built: bool) -> AbstractContextManager[object]:
    """Nothing for a part to build (tensors go to the current default device), else the meta
    device: shapes only, no memory, no initialisation draws."""
    return contextlib.nullcontext() if built else torch.device("meta")


class TransformerBlock(nn.Module):
    """`config.num_layers` layers, numbered 1..L, then a final norm.

    `layer_spec` is one `TransformerLayerSubmodules` for every layer, or a sequence with one
    per layer (`layer_spec[i]` builds layer number `i + 1`), e.g. dense layers first and MoE
    layers after (see `protoformer.recipes.layer_specs_from_pattern`). `self.layer_specs`
    keeps the per-layer list.

    The final norm (`post_layer_norm`, needed by pre-norm models) is built by the last layer's
    `input_layernorm` builder, so it is the same kind of norm as the layers' (its
    `post_mlp_layernorm` builder when the pre-norm slot holds `IdentityOp`: OLMo 2's layers
    normalize only their branches' outputs, and the model still ends in a norm).

    Each layer is initialised from its own random stream (`fork_init_rng` named by its
    number, seeded by one draw from the default RNG), so its weights do not depend on which
    layers were built before it. `built_layers` (0-based indices; None: all) names the layers
    to allocate and initialise: the others are built on the meta device (shapes only), as a
    pipeline rank builds only the layers of its stages; the final norm is built with the last
    layer.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: LayerSpecs,
        *,
        pg: ProcessGroups | None = None,
        post_layer_norm: bool = True,
        built_layers: Container[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_specs = per_layer_specs(layer_spec, config.num_layers)
        init_seed = draw_init_seed()
        layers: list[TransformerLayer] = []
        for index, spec in enumerate(self.layer_specs):
            built = built_layers is None or index in built_layers
            with fork_init_rng(init_seed, f"layers.{index}"), built_on(built):
                layers.append(TransformerLayer(config, spec, layer_number=index + 1, pg=pg))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm: LayerNormInterface | None = None
        if post_layer_norm:
            last = self.layer_specs[-1]
            norm = last.input_layernorm
            if norm is IdentityOp and last.post_mlp_layernorm is not None:
                norm = last.post_mlp_layernorm  # post-norm layers (OLMo 2): a norm of that kind
            with built_on(built_layers is None or config.num_layers - 1 in built_layers):
                self.final_layernorm = norm(config.hidden_size, config=config,
                                            eps=config.layernorm_epsilon)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> Tensor:
        for layer in self.layers:
            assert isinstance(layer, TransformerLayer)
            hidden_states = apply_module(layer)(
                hidden_states, attention_mask, context=context, context_mask=context_mask,
                rotary_pos_emb=rotary_pos_emb, inference_context=inference_context)  # [s, b, h]
        if self.final_layernorm is not None:
            hidden_states = apply_module(self.final_layernorm)(hidden_states)
        return hidden_states
