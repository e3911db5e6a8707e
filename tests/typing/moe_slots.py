"""Typing test: the MoE slots (router, experts, shared experts, grouped linears) take the right
builders, and only those; `MoELayer` fills a transformer layer's `mlp` slot.

Checked by pyright and mypy (not run). Each line that must be rejected carries the expected
error code for both checkers; with unused-ignore reporting on, a checker that stops rejecting
the line fails the typing test.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider
from protoformer.parallel import ColumnParallelLinear, ProcessGroups, RowParallelLinear
from protoformer.recipes import gpt_layer_spec, mlp_spec
from protoformer.recipes.moe import moe_spec
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLPBuilder
from protoformer.transformer.moe import (
    ExpertActivation,
    ExpertsBuilder,
    GroupedLinear,
    GroupedLinearFc2Builder,
    GroupedMLP,
    GroupedMLPSubmodules,
    MoELayer,
    MoESubmodules,
    RouterBuilder,
    SequentialMLP,
    SharedExpertsBuilder,
    TopKRouter,
)


class MyExperts(nn.Module):
    """A user-written experts layer: constructor and forward as `ExpertsBuilder` asks."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, /, *,
                 pg: ProcessGroups | None = None) -> None:
        super().__init__()

    def forward(self, dispatched_input: Tensor, tokens_per_expert: Tensor,
                permuted_probs: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return dispatched_input, None


class ExpertsReturningTensor(nn.Module):
    """The experts' constructor, but `forward` returns one tensor instead of (output, bias)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, /, *,
                 pg: ProcessGroups | None = None) -> None:
        super().__init__()

    def forward(self, dispatched_input: Tensor, tokens_per_expert: Tensor,
                permuted_probs: Tensor, /) -> Tensor:
        return dispatched_input


def accepted(backend: BackendSpecProvider, config: TransformerConfig) -> None:
    router: RouterBuilder = TopKRouter
    experts: ExpertsBuilder = MyExperts
    fc2: GroupedLinearFc2Builder = backend.grouped_linear()
    del fc2
    MoESubmodules(router=router, experts=experts)
    MoESubmodules(router=backend.router(), experts=MyExperts)
    MoESubmodules(
        router=backend.router(),
        experts=functools.partial(GroupedMLP, submodules=GroupedMLPSubmodules(
            linear_fc1=GroupedLinear, linear_fc2=backend.grouped_linear(),
            activation=backend.expert_activation())),
    )
    MoESubmodules(router=TopKRouter,
                  experts=functools.partial(SequentialMLP, submodules=mlp_spec(backend, config)))
    # MoE is an MLP kind: the layer's `mlp` slot takes it with no new slot.
    moe: MLPBuilder = functools.partial(MoELayer, submodules=moe_spec(backend, config))
    dense = gpt_layer_spec(backend, config)
    TransformerLayerSubmodules(
        input_layernorm=dense.input_layernorm, self_attention=dense.self_attention,
        pre_mlp_layernorm=dense.pre_mlp_layernorm, mlp=moe)


def rejected(backend: BackendSpecProvider, experts: ExpertsBuilder,
             shared: SharedExpertsBuilder) -> None:
    MoESubmodules(
        router=TopKRouter,
        experts=TopKRouter,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MoESubmodules(
        router=backend.router(),
        experts=backend.router(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MoESubmodules(
        router=experts,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        experts=experts,
    )
    MoESubmodules(
        router=TopKRouter,
        experts=experts,
        shared_experts=experts,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MoESubmodules(
        router=TopKRouter,
        experts=shared,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MoESubmodules(
        router=TopKRouter,
        experts=ExpertsReturningTensor,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    GroupedMLPSubmodules(
        linear_fc1=GroupedLinear,
        linear_fc2=ColumnParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        activation=ExpertActivation,
    )
    GroupedMLPSubmodules(
        linear_fc1=backend.grouped_linear(),
        linear_fc2=backend.column_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        activation=backend.expert_activation(),
    )
    GroupedMLPSubmodules(
        linear_fc1=RowParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_fc2=GroupedLinear,
        activation=ExpertActivation,
    )
    GroupedMLPSubmodules(
        linear_fc1=GroupedLinear,
        linear_fc2=GroupedLinear,
        activation=backend.activation(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
