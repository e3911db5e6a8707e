"""Builder/Interface protocols of the attention slots: core attention and whole attention layers.

`protoformer.transformer.attention` re-exports these; they live here so that attention, MLA
and the transformer layer can share them without importing each other.
"""

from __future__ import annotations

from typing import Literal, Protocol

from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext

__all__ = [
    "AttentionBuilder",
    "AttentionInterface",
    "CoreAttentionBuilder",
    "CoreAttentionInterface",
    "CrossAttentionBuilder",
    "SelfAttentionBuilder",
]

AttentionTypeName = Literal["self", "cross"]


class CoreAttentionInterface(Protocol):
    """Softmax attention of already-projected heads.

    query `[sq, b, np, hn]`, key `[sk, b, ng, hn]`, value `[sk, b, ng, hv]` (`ng` divides `np`;
    grouped heads are shared) -> context `[sq, b, np * hv]`. A boolean `attention_mask`
    (broadcastable to `[b, np, sq, sk]`) is True where attention is blocked; a floating one is
    added to the scores.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        /,
        *,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
    ) -> Tensor: ...


class CoreAttentionBuilder(Protocol):
    """Builds core attention for one layer.

    `window_size`: with a causal mask type, each query attends at most the `window_size` keys
    ending at its own position (sliding-window attention, Mistral/Gemma 2's `sliding_window`);
    None attends every earlier key.
    """

    def __call__(
        self,
        config: TransformerConfig,
        /,
        *,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: AttentionTypeName,
        attention_dropout: float | None,
        softmax_scale: float | None,
        pg: ProcessGroups | None,
        window_size: int | None,
    ) -> CoreAttentionInterface: ...


class AttentionInterface(Protocol):
    """A whole attention layer: `[s, b, h]` in, (`[s, b, h]`, output bias or None) out."""

    def forward(
        self,
        hidden_states: Tensor,
        /,
        attention_mask: Tensor | None = None,
        *,
        key_value_states: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> tuple[Tensor, Tensor | None]: ...


class AttentionBuilder(Protocol):
    """Builds an attention layer (self, cross or multi-latent) for a transformer layer slot.

    A layer class with its own `submodules` fills the slot as a `functools.partial`:
    `partial(SelfAttention, submodules=SelfAttentionSubmodules(...))`.
    """

    def __call__(
        self, config: TransformerConfig, /, *, layer_number: int, pg: ProcessGroups | None
    ) -> AttentionInterface: ...


SelfAttentionBuilder = AttentionBuilder
CrossAttentionBuilder = AttentionBuilder
