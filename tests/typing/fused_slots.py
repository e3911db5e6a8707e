"""Typing test: the fused backend's builders fill the same typed slots as the local ones.

Checked by pyright and mypy (not run). `FusedSpecProvider` is a `BackendSpecProvider`; each
fused builder class is accepted in every slot of its kind and rejected in the slots of
another kind (the expected error is marked for both checkers on the same line).
"""

from __future__ import annotations

import functools

from protoformer.backends import BackendSpecProvider
from protoformer.backends.fused import (
    FusedActivation,
    FusedLayerNorm,
    FusedRMSNorm,
    FusedSDPAttention,
    FusedSpecProvider,
)
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.interfaces import AttentionBuilder, CoreAttentionBuilder
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP, ActivationBuilder, MLPSubmodules
from protoformer.transformer.norm import LayerNormBuilder


def fused_backend_is_a_backend() -> BackendSpecProvider:
    return FusedSpecProvider(attention_kernels=("cudnn", "flash"))


def fused_classes_in_their_slots() -> TransformerLayerSubmodules:
    backend = FusedSpecProvider()
    norm: LayerNormBuilder = FusedRMSNorm
    layer_norm: LayerNormBuilder = FusedLayerNorm
    core: CoreAttentionBuilder = FusedSDPAttention
    core_with_kernels: CoreAttentionBuilder = functools.partial(FusedSDPAttention, kernels=("flash",))
    activation: ActivationBuilder = FusedActivation
    attention = SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=core,
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=norm,
        k_layernorm=backend.layer_norm(rms_norm=True, for_qk=True),
    )
    mlp = MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.row_parallel_linear(),
        activation=activation,
    )
    self_attention: AttentionBuilder = functools.partial(SelfAttention, submodules=attention)
    del layer_norm, core_with_kernels
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=self_attention,
        pre_mlp_layernorm=backend.layer_norm(rms_norm=True),
        mlp=functools.partial(MLP, submodules=mlp),
    )


def fused_classes_rejected_in_other_kinds() -> None:
    backend = FusedSpecProvider()
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=FusedRMSNorm,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        linear_proj=backend.row_parallel_linear(),
    )
    SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=FusedSDPAttention,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.row_parallel_linear(),
        activation=FusedLayerNorm,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    )
    MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(),
        linear_fc2=backend.column_parallel_linear(),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        activation=backend.activation(),
    )
    wrong_norm: LayerNormBuilder = FusedActivation  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    del wrong_norm
