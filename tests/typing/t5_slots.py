"""Typing test: the encoder-decoder recipes produce layer specs `T5Model` takes, and the decoder's
cross-attention slots take the same general builders as self-attention's.

Checked by pyright and mypy (not run). Each line that must be rejected carries the expected
error code for both checkers.
"""

from __future__ import annotations

from protoformer import TransformerConfig
from protoformer.backends import BackendSpecProvider
from protoformer.models import T5Model
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.recipes import mlp_spec, t5_decoder_layer_spec, t5_encoder_layer_spec
from protoformer.transformer.attention import CrossAttentionSubmodules


def t5_model(backend: BackendSpecProvider, config: TransformerConfig) -> T5Model:
    return T5Model(config, t5_encoder_layer_spec(backend, config),
                   t5_decoder_layer_spec(backend, config), 32128, 512,
                   encoder_config=config, position_embedding_type="relative")


def miswired_model(backend: BackendSpecProvider, config: TransformerConfig) -> None:
    T5Model(config, mlp_spec(backend, config),  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
            t5_decoder_layer_spec(backend, config), 32128, 512)
    T5Model(config, t5_encoder_layer_spec(backend, config), t5_decoder_layer_spec(backend, config),
            32128, 512, position_embedding_type="alibi")  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def cross_attention_slots(backend: BackendSpecProvider) -> list[CrossAttentionSubmodules]:
    right = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(), linear_kv=ColumnParallelLinear,
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear())
    kv_row_parallel = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(),
        linear_kv=RowParallelLinear,  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear())
    proj_column_parallel = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(), linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.column_parallel_linear())  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    return [right, kv_row_parallel, proj_column_parallel]
