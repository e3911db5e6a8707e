"""Typing test: attention slots take the right *general* layer kinds, and only those.

Checked by pyright and mypy (not run). Each line that must be rejected carries the expected
error code for both checkers; with unused-ignore reporting on, a checker that stops
rejecting the line fails the typing test.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider, LocalSpecProvider
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.parallel.groups import ProcessGroup
from protoformer.parallel.protocols import InitMethod
from protoformer.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    LinearProjBuilder,
    LinearQkvBuilder,
    SelfAttention,
    SelfAttentionSubmodules,
)
from protoformer.transformer.interfaces import AttentionBuilder


class ProjReturningTensor(nn.Module):
    """Row-parallel keywords, but `forward` returns a bare Tensor instead of (output, bias)."""

    def __init__(self, input_size: int, output_size: int, /, *, config: TransformerConfig,
                 init_method: InitMethod, bias: bool, input_is_parallel: bool,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: str | None,
                 tp_group: ProcessGroup | None) -> None:
        super().__init__()

    def forward(self, hidden_states: Tensor, /) -> Tensor:
        return hidden_states

    def backward_dw(self) -> None: ...


class ProjWithoutBackwardDw(nn.Module):
    """Row-parallel keywords and the right `forward`, but no `backward_dw`."""

    def __init__(self, input_size: int, output_size: int, /, *, config: TransformerConfig,
                 init_method: InitMethod, bias: bool, input_is_parallel: bool,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: str | None,
                 tp_group: ProcessGroup | None) -> None:
        super().__init__()

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return hidden_states, None


class Fp8RowLinear(nn.Module):
    """A correct row-parallel linear with an extra required option, bound by functools.partial."""

    def __init__(self, input_size: int, output_size: int, /, *, config: TransformerConfig,
                 init_method: InitMethod, bias: bool, input_is_parallel: bool,
                 skip_bias_add: bool, is_expert: bool, tp_comm_buffer_name: str | None,
                 tp_group: ProcessGroup | None, fp8_margin: int) -> None:
        super().__init__()

    def forward(self, hidden_states: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return hidden_states, None

    def backward_dw(self) -> None: ...


def accepted_through_the_protocol(backend: BackendSpecProvider) -> SelfAttentionSubmodules:
    # `backend` is typed as the protocol: the check holds for every backend, not just one class.
    return SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
        k_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
    )


def accepted_classes_and_partials(backend: BackendSpecProvider) -> None:
    SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=backend.core_attention(),
        linear_proj=functools.partial(Fp8RowLinear, fp8_margin=0),
    )
    CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(),
        linear_kv=ColumnParallelLinear,
        core_attention=backend.core_attention(),
        linear_proj=RowParallelLinear,
    )
    proj: LinearProjBuilder = RowParallelLinear
    qkv: LinearQkvBuilder = backend.column_parallel_linear()
    del proj, qkv


def local_backend_is_a_backend() -> BackendSpecProvider:
    return LocalSpecProvider()


def rejected_layer_kinds(backend: BackendSpecProvider) -> None:
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.column_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=ColumnParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    SelfAttentionSubmodules(
        linear_qkv=RowParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(),
        linear_kv=backend.row_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )


def rejected_interfaces(backend: BackendSpecProvider) -> None:
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=ProjReturningTensor,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=ProjWithoutBackwardDw,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=Fp8RowLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )


def attention_builders(backend: BackendSpecProvider) -> list[AttentionBuilder]:
    self_submodules = accepted_through_the_protocol(backend)
    cross_submodules = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(),
        linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )
    self_attention: AttentionBuilder = functools.partial(SelfAttention, submodules=self_submodules)
    cross_attention: AttentionBuilder = functools.partial(CrossAttention, submodules=cross_submodules)
    wrong_record: AttentionBuilder = functools.partial(SelfAttention, submodules=cross_submodules)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    return [self_attention, cross_attention, wrong_record]
