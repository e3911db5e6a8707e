"""Typing test: the post-norm slots of a transformer layer (Gemma 2/3 sandwich norms, OLMo 2)
take norm builders, `IdentityOp` fills a norm slot, and the Gemma/OLMo recipes return layer specs.

Checked by pyright and mypy (not run).
"""

from __future__ import annotations

import functools

from protoformer import TransformerConfig
from protoformer.architectures.gemma2 import gemma2_layer_spec, gemma2_layer_specs
from protoformer.architectures.olmo2 import olmo2_layer_spec
from protoformer.backends import LocalSpecProvider
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.core_attention import SDPAttention
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP, MLPSubmodules
from protoformer.transformer.norm import IdentityOp, LayerNormBuilder, RMSNorm
from protoformer.transformer.projection_norm import ProjectionRMSNorm


def slots(config: TransformerConfig) -> None:
    backend = LocalSpecProvider()
    attention = functools.partial(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(), core_attention=SDPAttention,
        linear_proj=backend.row_parallel_linear()))
    mlp = functools.partial(MLP, submodules=MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear(),
        activation=backend.activation()))
    # Sandwich norms: pre- and post-norms around both branches.
    TransformerLayerSubmodules(input_layernorm=RMSNorm, self_attention=attention,
                               post_self_attn_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
                               mlp=mlp, post_mlp_layernorm=RMSNorm)
    # Post-norms only: IdentityOp is a norm builder.
    identity: LayerNormBuilder = IdentityOp
    TransformerLayerSubmodules(input_layernorm=IdentityOp, self_attention=attention,
                               post_self_attn_layernorm=RMSNorm, pre_mlp_layernorm=identity,
                               mlp=mlp, post_mlp_layernorm=None)
    # Miswirings: a layer or a linear where a post-norm goes, a norm needing another keyword.
    TransformerLayerSubmodules(input_layernorm=RMSNorm, self_attention=attention,
                               post_self_attn_layernorm=attention,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
                               pre_mlp_layernorm=RMSNorm, mlp=mlp)
    TransformerLayerSubmodules(input_layernorm=RMSNorm, self_attention=attention,
                               pre_mlp_layernorm=RMSNorm, mlp=mlp,
                               post_mlp_layernorm=backend.row_parallel_linear())  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    TransformerLayerSubmodules(input_layernorm=RMSNorm, self_attention=attention,
                               pre_mlp_layernorm=RMSNorm, mlp=mlp,
                               post_mlp_layernorm=ProjectionRMSNorm)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    # A sliding layer with its own rotary base, as Gemma 3's local layers.
    local: AttentionBuilderAlias = functools.partial(
        SelfAttention, submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(), core_attention=SDPAttention,
            linear_proj=backend.row_parallel_linear()), window_size=512, rotary_base=10000.0)
    del local


AttentionBuilderAlias = functools.partial[SelfAttention]


def recipes(config: TransformerConfig) -> list[TransformerLayerSubmodules]:
    backend = LocalSpecProvider()
    specs: LayerSpecs = gemma2_layer_specs(backend, config, [4096, None])
    del specs
    gemma2_layer_spec(backend, config, window_size="4096")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    gemma2_layer_spec(backend, config, rotary_base="10000")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    return [gemma2_layer_spec(backend, config, window_size=4096, rotary_base=10000.0),
            olmo2_layer_spec(backend, config)]
