"""Encoder-decoder (T5) layer recipes, assembled from a backend's general builders."""

from __future__ import annotations

import functools

from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import mlp_spec
from protoformer.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP

__all__ = ["t5_decoder_layer_spec", "t5_encoder_layer_spec"]


def _self_attention(backend: BackendSpecProvider, config: TransformerConfig) -> SelfAttentionSubmodules:
    qk_norm = (backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=True)
               if config.qk_layernorm else None)
    return SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=qk_norm,
        k_layernorm=qk_norm,
    )


def t5_encoder_layer_spec(backend: BackendSpecProvider,
                          config: TransformerConfig) -> TransformerLayerSubmodules:
    """A pre-norm encoder layer: bidirectional self-attention and an MLP.

    Self-attention masks with `AttnMaskType.padding`: no causal mask, only what the model
    passes (encoder padding, plus T5's relative position bias as an additive mask).
    """
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm")
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=functools.partial(SelfAttention, submodules=_self_attention(backend, config),
                                         attn_mask_type=AttnMaskType.padding),
        pre_mlp_layernorm=norm,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
    )


def t5_decoder_layer_spec(backend: BackendSpecProvider,
                          config: TransformerConfig) -> TransformerLayerSubmodules:
    """A pre-norm decoder layer: causal self-attention, cross-attention to the encoder, an MLP.

    Self-attention is `AttnMaskType.padding_causal` (causal, plus the relative position bias
    the model passes); cross-attention is `AttnMaskType.padding` (the encoder's padding only).
    Cross-attention's `linear_q` and `linear_kv` are the backend's column-parallel builder,
    its `linear_proj` the row-parallel one: the slots type-check like self-attention's.
    """
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm")
    cross = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(),
        linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=functools.partial(SelfAttention, submodules=_self_attention(backend, config),
                                         attn_mask_type=AttnMaskType.padding_causal),
        pre_cross_attn_layernorm=norm,
        cross_attention=functools.partial(CrossAttention, submodules=cross,
                                          attn_mask_type=AttnMaskType.padding),
        pre_mlp_layernorm=norm,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
    )
