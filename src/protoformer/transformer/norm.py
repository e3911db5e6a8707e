"""Normalization layers and their Builder/Interface protocols."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from protoformer.config import TransformerConfig

__all__ = ["LayerNormBuilder", "LayerNormInterface"]


class LayerNormInterface(Protocol):
    """A normalization over the last dimension."""

    def forward(self, x: Tensor, /) -> Tensor: ...


class LayerNormBuilder(Protocol):
    """Builds a normalization layer over `hidden_size` features."""

    def __call__(self, hidden_size: int, /, *, config: TransformerConfig, eps: float) -> LayerNormInterface: ...
