"""Enumerations shared by the transformer layers (Megatron-Core's names and values)."""

from __future__ import annotations

import enum

__all__ = ["AttnMaskType", "AttnType"]


class AttnMaskType(enum.Enum):
    """How attention is masked. A boolean `attention_mask` is True where attention is *blocked*."""

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4
    arbitrary = 5


class AttnType(enum.Enum):
    """Whether keys/values come from the same sequence as queries."""

    self_attn = 1
    cross_attn = 2
