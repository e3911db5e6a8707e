"""Typing test: MLP and transformer-layer slots take the right builders, and only those.

Checked by pyright and mypy (not run). Each line that must be rejected carries the expected
error code for both checkers; with unused-ignore reporting on, a checker that stops
rejecting the line fails the typing test.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.recipes import gpt_layer_spec, mlp_spec
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import (
    MLP,
    Activation,
    ActivationBuilder,
    LinearFc2Builder,
    MLPBuilder,
    MLPSubmodules,
)


class ActivationReturningTuple(nn.Module):
    """The activation's constructor, but `forward` returns a tuple instead of a Tensor."""

    def __init__(self, config: TransformerConfig, /, *, gated: bool) -> None:
        super().__init__()

    def forward(self, x: Tensor, /) -> tuple[Tensor, Tensor]:
        return x, x


class ActivationWithoutGated(nn.Module):
    """An activation that cannot be told whether to gate."""

    def __init__(self, config: TransformerConfig, /) -> None:
        super().__init__()

    def forward(self, x: Tensor, /) -> Tensor:
        return x


def one_row_parallel_builder_fills_both_row_slots(backend: BackendSpecProvider) -> None:
    # One backend call: the same row-parallel builder is attention's linear_proj and the
    # MLP's linear_fc2, because both slots are the general row-parallel kind.
    row = backend.row_parallel_linear()
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=row,
    )
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=row,
        activation=backend.activation(),
    )
    fc2: LinearFc2Builder = row
    del fc2


def accepted_classes(backend: BackendSpecProvider) -> MLPSubmodules:
    activation: ActivationBuilder = Activation
    del activation
    return MLPSubmodules(
        linear_fc1=ColumnParallelLinear,
        linear_fc2=RowParallelLinear,
        activation=Activation,
    )


def rejected_mlp_slots(backend: BackendSpecProvider) -> None:
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.column_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        activation=backend.activation(),
    )
    MLPSubmodules(
        linear_fc1=RowParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_fc2=RowParallelLinear,
        activation=backend.activation(),
    )
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        activation=backend.activation(),
    )
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.row_parallel_linear(),
        activation=ActivationReturningTuple,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.row_parallel_linear(),
        activation=ActivationWithoutGated,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )


def layer_slots(backend: BackendSpecProvider, config: TransformerConfig) -> None:
    norm = backend.layer_norm(rms_norm=True)
    attention = functools.partial(
        SelfAttention,
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
        ),
    )
    mlp = functools.partial(MLP, submodules=mlp_spec(backend, config))
    mlp_builder: MLPBuilder = mlp
    del mlp_builder
    TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=attention, pre_mlp_layernorm=norm, mlp=mlp)
    TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=mlp,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        pre_mlp_layernorm=norm,
        mlp=mlp,
    )
    TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=attention,
        pre_mlp_layernorm=norm,
        mlp=attention,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    TransformerLayerSubmodules(
        input_layernorm=backend.row_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        self_attention=attention,
        pre_mlp_layernorm=norm,
        mlp=mlp,
    )
    TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=attention,
        pre_mlp_layernorm=norm,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
        cross_attention=attention,
        pre_cross_attn_layernorm=norm,
    )


def recipe_result(backend: BackendSpecProvider, config: TransformerConfig) -> TransformerLayerSubmodules:
    return gpt_layer_spec(backend, config)
