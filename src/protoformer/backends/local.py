"""`LocalSpecProvider`: the plain-PyTorch implementation of every general layer kind.

Runs anywhere torch runs (CPU, CUDA, MPS), needs no optional dependency, and is the
reference the fused backends are compared against.
"""

from __future__ import annotations

from protoformer.parallel.layers import ColumnParallelLinear, Linear, RowParallelLinear
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    LinearBuilder,
    RowParallelLinearBuilder,
)
from protoformer.transformer.core_attention import SDPAttention
from protoformer.transformer.interfaces import CoreAttentionBuilder
from protoformer.transformer.mlp import Activation, ActivationBuilder
from protoformer.transformer.moe.experts import ExpertActivation, GroupedLinear
from protoformer.transformer.moe.protocols import (
    ExpertActivationBuilder,
    GroupedLinearBuilder,
    RouterBuilder,
)
from protoformer.transformer.moe.router import TopKRouter
from protoformer.transformer.norm import LayerNorm, LayerNormBuilder, RMSNorm

__all__ = ["LocalSpecProvider"]


class LocalSpecProvider:
    """The general layer builders in plain PyTorch (`BackendSpecProvider` with `name == "local"`).

    Each method returns the builder typed as its kind's protocol, so the type checkers verify
    here, once, that the class fits every slot of that kind.
    """

    name: str = "local"

    def column_parallel_linear(self) -> ColumnParallelLinearBuilder:
        """`ColumnParallelLinear`: output features split across tensor-parallel ranks."""
        return ColumnParallelLinear

    def row_parallel_linear(self) -> RowParallelLinearBuilder:
        """`RowParallelLinear`: input features split across tensor-parallel ranks."""
        return RowParallelLinear

    def linear(self) -> LinearBuilder:
        """`Linear`: the weight replicated on every rank."""
        return Linear

    def layer_norm(self, *, rms_norm: bool = False, for_qk: bool = False) -> LayerNormBuilder:
        """`RMSNorm` with `rms_norm`, else `LayerNorm`; the same classes serve the per-head q/k norm."""
        del for_qk  # the plain classes normalize any last dimension, heads included
        return RMSNorm if rms_norm else LayerNorm

    def core_attention(self) -> CoreAttentionBuilder:
        """`SDPAttention`: `torch.nn.functional.scaled_dot_product_attention` (fused where it can)."""
        return SDPAttention

    def activation(self) -> ActivationBuilder:
        """`Activation`: `config.activation_func`, gated or plain."""
        return Activation

    def router(self) -> RouterBuilder:
        """`TopKRouter`: softmax/sigmoid scores, (group-limited) top-k, aux losses, expert bias."""
        return TopKRouter

    def grouped_linear(self) -> GroupedLinearBuilder:
        """`GroupedLinear`: `torch._grouped_mm` on Hopper GPUs in bf16, a loop over experts elsewhere."""
        return GroupedLinear

    def expert_activation(self) -> ExpertActivationBuilder:
        """`ExpertActivation`: `config.activation_func` times the routing weight, plain PyTorch."""
        return ExpertActivation

    def __repr__(self) -> str:
        return "LocalSpecProvider()"
