"""A stack of transformer layers with the final norm of a pre-norm model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.spec import apply_module
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from protoformer.transformer.norm import IdentityOp, LayerNormInterface

__all__ = ["LayerSpecs", "TransformerBlock", "per_layer_specs"]

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
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: LayerSpecs,
        *,
        pg: ProcessGroups | None = None,
        post_layer_norm: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_specs = per_layer_specs(layer_spec, config.num_layers)
        self.layers = nn.ModuleList(
            TransformerLayer(config, spec, layer_number=number, pg=pg)
            for number, spec in enumerate(self.layer_specs, start=1)
        )
        self.final_layernorm: LayerNormInterface | None = None
        if post_layer_norm:
            last = self.layer_specs[-1]
            norm = last.input_layernorm
            if norm is IdentityOp and last.post_mlp_layernorm is not None:
                norm = last.post_mlp_layernorm  # post-norm layers (OLMo 2): a norm of that kind
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
