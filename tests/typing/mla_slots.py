"""Typing test: multi-latent attention's slots take the right *general* layer kinds, and only those.

Checked by pyright and mypy (not run). Each line that must be rejected carries the expected
error code for both checkers; with unused-ignore reporting on, a checker that stops
rejecting the line fails the typing test.
"""

from __future__ import annotations

import functools

from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider
from protoformer.parallel import ColumnParallelLinear, Linear, RowParallelLinear
from protoformer.recipes.mla import mla_layer_spec, mla_self_attention_spec
from protoformer.transformer.interfaces import AttentionBuilder
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mla import MLASelfAttentionSubmodules, MultiLatentAttention
from protoformer.transformer.norm import RMSNorm


def accepted_through_the_protocol(backend: BackendSpecProvider) -> MLASelfAttentionSubmodules:
    # `backend` is typed as the protocol: the check holds for every backend, not just one class.
    return MLASelfAttentionSubmodules(
        linear_q_down_proj=backend.linear(),
        linear_q_up_proj=backend.column_parallel_linear(),
        q_layernorm=backend.layer_norm(rms_norm=True),
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )


def accepted_direct_query_and_classes(backend: BackendSpecProvider) -> MLASelfAttentionSubmodules:
    return MLASelfAttentionSubmodules(
        linear_q_proj=ColumnParallelLinear,
        linear_kv_down_proj=Linear,
        linear_kv_up_proj=ColumnParallelLinear,
        kv_layernorm=RMSNorm,
        core_attention=backend.core_attention(),
        linear_proj=RowParallelLinear,
    )


def accepted_builders(backend: BackendSpecProvider, config: TransformerConfig) -> None:
    attention: AttentionBuilder = functools.partial(
        MultiLatentAttention, submodules=accepted_through_the_protocol(backend))
    spec: MLASelfAttentionSubmodules = mla_self_attention_spec(backend, config)
    layer: TransformerLayerSubmodules = mla_layer_spec(backend, config)
    del attention, spec, layer


def rejected_column_parallel_in_linear_proj(backend: BackendSpecProvider) -> None:
    MLASelfAttentionSubmodules(
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.core_attention(),
        linear_proj=backend.column_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MLASelfAttentionSubmodules(
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.core_attention(),
        linear_proj=ColumnParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )


def rejected_row_parallel_in_linear_kv_down_proj(backend: BackendSpecProvider) -> None:
    MLASelfAttentionSubmodules(
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_down_proj=backend.row_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )
    MLASelfAttentionSubmodules(
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_down_proj=RowParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )


def rejected_non_norm_in_kv_layernorm(backend: BackendSpecProvider) -> None:
    MLASelfAttentionSubmodules(
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )
    MLASelfAttentionSubmodules(
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=ColumnParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )


def rejected_other_kinds(backend: BackendSpecProvider) -> None:
    MLASelfAttentionSubmodules(
        linear_q_down_proj=backend.column_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_q_up_proj=backend.row_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        q_layernorm=backend.layer_norm(rms_norm=True),
        linear_kv_down_proj=backend.linear(),
        linear_kv_up_proj=backend.linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.layer_norm(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_proj=backend.row_parallel_linear(),
    )
    MLASelfAttentionSubmodules(  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]
        linear_q_proj=backend.column_parallel_linear(),
        linear_kv_up_proj=backend.column_parallel_linear(),
        kv_layernorm=backend.layer_norm(rms_norm=True),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
    )
