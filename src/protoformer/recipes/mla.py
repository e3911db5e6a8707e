"""The DeepSeek-style layer recipe: multi-latent attention and a dense MLP, from a backend."""

from __future__ import annotations

import functools

from protoformer.backends.base import BackendSpecProvider
from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.recipes.gpt import mlp_spec
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mla import MLASelfAttentionSubmodules, MultiLatentAttention
from protoformer.transformer.mlp import MLP

__all__ = ["mla_layer_spec", "mla_self_attention_spec"]


def _require_mla(config: TransformerConfig, recipe: str) -> MLATransformerConfig:
    if not isinstance(config, MLATransformerConfig):
        raise TypeError(f"{recipe} needs an MLATransformerConfig (q_lora_rank, kv_lora_rank, ...), "
                        f"got {type(config).__qualname__}; build the config with "
                        "protoformer.MLATransformerConfig")
    return config


def mla_self_attention_spec(backend: BackendSpecProvider,
                            config: TransformerConfig) -> MLASelfAttentionSubmodules:
    """The slots of `MultiLatentAttention` for `config` (an `MLATransformerConfig`).

    Down-projections are the backend's replicated `linear`, up-projections its column-parallel
    linear, the latent norms RMSNorm, the output projection row-parallel. The query slots
    follow `config.q_lora_rank`: `linear_q_proj` when it is None, else the compressed path.
    """
    mla = _require_mla(config, "mla_self_attention_spec")
    compressed_q = mla.q_lora_rank is not None
    norm = backend.layer_norm(rms_norm=True)
    return MLASelfAttentionSubmodules(
        linear_q_proj=None if compressed_q else backend.column_parallel_linear(),
        linear_q_down_proj=backend.linear() if compressed_q else None,
        linear_q_up_proj=backend.column_parallel_linear() if compressed_q else None,
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        q_layernorm=norm if compressed_q else None,
        kv_layernorm=norm,
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )


def mla_layer_spec(backend: BackendSpecProvider,
                   config: TransformerConfig) -> TransformerLayerSubmodules:
    """A pre-norm decoder layer with multi-latent attention and a dense MLP.

    `config` must be an `MLATransformerConfig` (typed `TransformerConfig` so the recipe fits
    wherever a layer recipe `(backend, TransformerConfig) -> TransformerLayerSubmodules` goes).
    The layer norms follow `config.normalization` (RMSNorm by default for MLA configs).
    """
    attention = mla_self_attention_spec(backend, config)
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm")
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=functools.partial(MultiLatentAttention, submodules=attention),
        pre_mlp_layernorm=norm,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
    )
