"""Typing test: the layer's parallel-residual option (GPT-NeoX) is a bool, and only that.

Checked by pyright and mypy (not run). The runtime check (`TransformerLayerSubmodules`'
`__post_init__`) refuses the same values, and a parallel layer with cross-attention.
"""

from __future__ import annotations

import functools

from protoformer import TransformerConfig
from protoformer.architectures.gpt_neox import gpt_neox_layer_spec
from protoformer.backends import LocalSpecProvider
from protoformer.recipes import gpt_layer_spec
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP, MLPSubmodules


def slots(config: TransformerConfig) -> None:
    backend = LocalSpecProvider()
    norm = backend.layer_norm(rms_norm=False)
    attention = functools.partial(
        SelfAttention, attn_mask_type=AttnMaskType.padding_causal,
        submodules=SelfAttentionSubmodules(linear_qkv=backend.column_parallel_linear(),
                                           core_attention=backend.core_attention(),
                                           linear_proj=backend.row_parallel_linear()))
    mlp = functools.partial(MLP, submodules=MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear(),
        activation=backend.activation()))
    TransformerLayerSubmodules(input_layernorm=norm, self_attention=attention,
                               pre_mlp_layernorm=norm, mlp=mlp, parallel_residual=True)
    TransformerLayerSubmodules(input_layernorm=norm, self_attention=attention,
                               pre_mlp_layernorm=norm, mlp=mlp,
                               parallel_residual="yes")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    TransformerLayerSubmodules(input_layernorm=norm, self_attention=attention,
                               pre_mlp_layernorm=norm, mlp=mlp,
                               parallel_residual=None)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    # An MLP builder in the norm's slot stays refused next to the new option.
    TransformerLayerSubmodules(input_layernorm=norm, self_attention=attention,
                               pre_mlp_layernorm=mlp,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
                               mlp=mlp, parallel_residual=True)
    gpt_layer_spec(backend, config, parallel_residual=True)
    gpt_layer_spec(backend, config, parallel_residual=1.0)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    gpt_neox_layer_spec(backend, config, parallel_residual=False)
    gpt_neox_layer_spec(backend, config, parallel_residual="no")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
