"""Typing test: core attention builders take the sliding-window option, and only those do.

Checked by pyright and mypy (not run). A core attention whose constructor lacks
`window_size` cannot fill the `core_attention` slot: the parent passes the layer's window.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import LocalSpecProvider
from protoformer.parallel.groups import ProcessGroups
from protoformer.recipes import gpt_layer_spec
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.interfaces import AttentionBuilder, AttentionTypeName
from protoformer.transformer.layer import TransformerLayerSubmodules


class CoreWithoutWindow(nn.Module):
    """Every core-attention keyword but `window_size` (written before sliding windows)."""

    def __init__(self, config: TransformerConfig, /, *, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: AttentionTypeName,
                 attention_dropout: float | None, softmax_scale: float | None,
                 pg: ProcessGroups | None) -> None:
        super().__init__()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                /, *, attn_mask_type: AttnMaskType | None = None,
                attention_bias: Tensor | None = None) -> Tensor:
        return query


class CoreWithStringWindow(nn.Module):
    """`window_size` typed as a string: the parent passes `int | None`."""

    def __init__(self, config: TransformerConfig, /, *, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: AttentionTypeName,
                 attention_dropout: float | None, softmax_scale: float | None,
                 pg: ProcessGroups | None, window_size: str) -> None:
        super().__init__()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                /, *, attn_mask_type: AttnMaskType | None = None,
                attention_bias: Tensor | None = None) -> Tensor:
        return query


def slots() -> None:
    backend = LocalSpecProvider()
    SelfAttentionSubmodules(linear_qkv=backend.column_parallel_linear(),
                            core_attention=SDPAttention,
                            linear_proj=backend.row_parallel_linear())
    SelfAttentionSubmodules(linear_qkv=backend.column_parallel_linear(),
                            core_attention=DotProductAttention,
                            linear_proj=backend.row_parallel_linear())
    SelfAttentionSubmodules(linear_qkv=backend.column_parallel_linear(),
                            core_attention=CoreWithoutWindow,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
                            linear_proj=backend.row_parallel_linear())
    SelfAttentionSubmodules(linear_qkv=backend.column_parallel_linear(),
                            core_attention=CoreWithStringWindow,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
                            linear_proj=backend.row_parallel_linear())


def windowed_layers(config: TransformerConfig) -> list[TransformerLayerSubmodules]:
    # A sliding-window layer is a self-attention slot with the window bound per layer.
    backend = LocalSpecProvider()
    local: TransformerLayerSubmodules = gpt_layer_spec(backend, config, window_size=4096)
    attention: AttentionBuilder = functools.partial(
        SelfAttention, submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(), core_attention=SDPAttention,
            linear_proj=backend.row_parallel_linear()), window_size=512)
    gpt_layer_spec(backend, config, window_size="4096")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    del attention
    return [local, gpt_layer_spec(backend, config)]
