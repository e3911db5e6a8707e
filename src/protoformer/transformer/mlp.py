"""The MLP block and the Builder/Interface protocols of its slots."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.parallel.protocols import ColumnParallelLinearBuilder, RowParallelLinearBuilder

__all__ = [
    "ActivationBuilder",
    "ActivationInterface",
    "LinearFc1Builder",
    "LinearFc2Builder",
]

LinearFc1Builder = ColumnParallelLinearBuilder
"""The MLP's first linear: the column-parallel builder (output split over ranks)."""

LinearFc2Builder = RowParallelLinearBuilder
"""The MLP's second linear: *the same* row-parallel builder as attention's `linear_proj`."""


class ActivationInterface(Protocol):
    """The MLP's nonlinearity. Gated: `[..., 2 * f]` (gate then up) -> `[..., f]`; else shape-preserving."""

    def forward(self, x: Tensor, /) -> Tensor: ...


class ActivationBuilder(Protocol):
    """Builds the MLP's activation from the config (`activation_func`, `gated_linear_unit`)."""

    def __call__(self, config: TransformerConfig, /, *, gated: bool) -> ActivationInterface: ...
