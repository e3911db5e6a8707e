"""A stack of transformer layers with the final norm of a pre-norm model."""

from __future__ import annotations

from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.spec import apply_module
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from protoformer.transformer.norm import LayerNormInterface

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """`config.num_layers` layers built from one spec, numbered 1..L, then a final norm.

    The final norm (`post_layer_norm`, needed by pre-norm models) is built by the spec's
    `input_layernorm` builder, so it is the same kind of norm as every layer's.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: TransformerLayerSubmodules,
        *,
        pg: ProcessGroups | None = None,
        post_layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(layer_spec, TransformerLayerSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"TransformerBlock expects layer_spec=TransformerLayerSubmodules(...), "
                            f"got {type(layer_spec).__qualname__}")
        self.config = config
        self.layers = nn.ModuleList(
            TransformerLayer(config, layer_spec, layer_number=number, pg=pg)
            for number in range(1, config.num_layers + 1)
        )
        self.final_layernorm: LayerNormInterface | None = None
        if post_layer_norm:
            self.final_layernorm = layer_spec.input_layernorm(
                config.hidden_size, config=config, eps=config.layernorm_epsilon)

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
