"""`BackendSpecProvider`: the general layer builders of one implementation family.

Every method returns a Builder *protocol*, never bare `type`: a bare `type` is accepted in any
slot by pyright (and rejected in every slot by mypy), so it would hide miswirings. Returning
the protocol lets the checker verify the backend's choice once, for every slot of that kind.
"""

from __future__ import annotations

from typing import Protocol

from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    LinearBuilder,
    RowParallelLinearBuilder,
)
from protoformer.transformer.interfaces import CoreAttentionBuilder
from protoformer.transformer.mlp import ActivationBuilder
from protoformer.transformer.moe.protocols import (
    ExpertActivationBuilder,
    GroupedLinearBuilder,
    RouterBuilder,
)
from protoformer.transformer.norm import LayerNormBuilder

__all__ = ["BackendSpecProvider"]


class BackendSpecProvider(Protocol):
    """Supplies the builder for each general layer kind."""

    name: str

    def column_parallel_linear(self) -> ColumnParallelLinearBuilder:
        """The linear layer whose output is split across tensor-parallel ranks."""
        ...

    def row_parallel_linear(self) -> RowParallelLinearBuilder:
        """The linear layer whose input is split across tensor-parallel ranks."""
        ...

    def linear(self) -> LinearBuilder:
        """A linear layer replicated on every rank (MLA's down-projections)."""
        ...

    def layer_norm(self, *, rms_norm: bool = False, for_qk: bool = False) -> LayerNormBuilder:
        """LayerNorm, or RMSNorm with `rms_norm`; `for_qk` asks for the per-head q/k norm."""
        ...

    def core_attention(self) -> CoreAttentionBuilder:
        """Softmax attention over projected heads."""
        ...

    def activation(self) -> ActivationBuilder:
        """The MLP nonlinearity (gated or not, per the config)."""
        ...

    def router(self) -> RouterBuilder:
        """The MoE router (scores tokens against the experts, picks the top-k)."""
        ...

    def grouped_linear(self) -> GroupedLinearBuilder:
        """One linear per local expert in one weight tensor (the MoE experts' fc1 and fc2)."""
        ...

    def expert_activation(self) -> ExpertActivationBuilder:
        """The experts' nonlinearity times the routing weight (one pass when fused)."""
        ...
