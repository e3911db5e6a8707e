"""The decoder-only (GPT / Llama) layer recipe, assembled from a backend's general builders."""

from __future__ import annotations

import functools

from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP, MLPSubmodules

__all__ = ["gpt_layer_spec", "mlp_spec"]


def mlp_spec(backend: BackendSpecProvider, config: TransformerConfig) -> MLPSubmodules:
    """The MLP's slots: column-parallel `fc1`, the backend's activation, row-parallel `fc2`.

    Whether the activation is gated (SwiGLU/GeGLU) is read from `config.gated_linear_unit`
    when the MLP is built; the recipe itself does not depend on it.
    """
    del config  # the same slots serve every MLP configuration
    return MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.row_parallel_linear(),
        activation=backend.activation(),
    )


def gpt_layer_spec(backend: BackendSpecProvider, config: TransformerConfig, *,
                   window_size: int | None = None,
                   parallel_residual: bool = False) -> TransformerLayerSubmodules:
    """A pre-norm decoder layer: causal self-attention and an MLP, norms per `config.normalization`.

    `window_size=W` makes the self-attention sliding-window attention over `W` positions
    (a list of these specs, one per layer, mixes local and global layers).
    `parallel_residual=True` adds attention and MLP of the same input (GPT-NeoX).
    With `config.qk_layernorm` the queries and keys are normalized per head (same norm kind).
    Self-attention masks with `AttnMaskType.padding_causal`: always causal, and an
    `attention_mask` given to the model (e.g. padding) blocks positions on top of that.
    Without a mask it runs the plain causal kernel.
    """
    rms_norm = config.normalization == "RMSNorm"
    norm = backend.layer_norm(rms_norm=rms_norm)
    qk_norm = backend.layer_norm(rms_norm=rms_norm, for_qk=True) if config.qk_layernorm else None
    attention = SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=qk_norm,
        k_layernorm=qk_norm,
    )
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=(
            functools.partial(SelfAttention, submodules=attention,
                              attn_mask_type=AttnMaskType.padding_causal)
            if window_size is None else
            functools.partial(SelfAttention, submodules=attention,
                              attn_mask_type=AttnMaskType.padding_causal, window_size=window_size)),
        pre_mlp_layernorm=norm,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
        parallel_residual=parallel_residual,
    )
