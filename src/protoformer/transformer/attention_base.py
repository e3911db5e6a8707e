"""The base of self- and cross-attention: heads over ranks, shared slots, attend and project.

`Attention` splits the heads over the tensor-parallel group (with replicated key/value heads
when `num_query_groups < tp`, in the fused layout `protoformer.transformer.attention`
describes), builds the slots both kinds share (per-head q/k norms, core attention, output
projection) and runs core attention then the output projection, with selective
recomputation. `SelfAttention` and `CrossAttention` (in `protoformer.transformer.attention`,
which re-exports this class) add their input projections and `forward`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

from protoformer.config import TransformerConfig
from protoformer.initialization import init_method_normal, scaled_init_method_normal
from protoformer.parallel.grads import mark_partial_grad_over_tp
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    ColumnParallelLinearInterface,
    RowParallelLinearBuilder,
    RowParallelLinearInterface,
)
from protoformer.parallel.random import checkpoint_rng_context_fn
from protoformer.spec import apply_module
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import (
    AttentionTypeName,
    CoreAttentionBuilder,
    CoreAttentionInterface,
)
from protoformer.transformer.kv_replication import ReplicatedKeyValue
from protoformer.transformer.masks import check_mask
from protoformer.transformer.norm import LayerNormBuilder, LayerNormInterface

# torch leaves checkpoint's `function` parameter unannotated; this is the type we call it with.
_checkpoint = cast("Callable[..., object]", torch_checkpoint.checkpoint)  # pyright: ignore[reportUnknownMemberType]

__all__ = ["Attention"]


class Attention(nn.Module, abc.ABC):
    """What self- and cross-attention share: head bookkeeping, core attention, output projection.

    Heads are split over the tensor-parallel group `pg.tp`: each rank holds `np / tp` query
    heads and `ng / tp` key/value heads (one replicated head when `ng < tp`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: AttentionTypeName,
        *,
        pg: ProcessGroups | None,
    ) -> None:
        super().__init__()
        if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 1:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise ValueError(f"layer_number={layer_number!r}: layers are numbered from 1")
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.attention_type: AttentionTypeName = attention_type
        self.pg = pg if pg is not None else ProcessGroups()
        # Sliding-window attention (set by SelfAttention before its slots are built).
        self.window_size: int | None = None
        tp = self.pg.tp_size
        heads, groups = config.num_attention_heads, config.query_groups
        self.hidden_size_per_attention_head = config.head_dim
        self.query_projection_size = config.head_dim * heads
        if heads % tp != 0:
            raise ValueError(f"num_attention_heads={heads} must be divisible by the tensor-parallel "
                             f"size {tp}")
        if groups >= tp and groups % tp != 0:
            raise ValueError(f"num_query_groups={groups} must be divisible by the tensor-parallel "
                             f"size {tp} (or divide it, to replicate key/value heads)")
        if groups < tp and tp % groups != 0:
            raise ValueError(f"num_query_groups={groups} must divide the tensor-parallel size "
                             f"{tp} when smaller than it, so each rank's heads share one group")
        self.num_attention_heads_per_partition = heads // tp
        self.num_query_groups_per_partition = max(1, groups // tp)
        self._replicated_kv = ReplicatedKeyValue(self.pg, groups)
        # Each key/value head is held by `kv_replicas` ranks (1 unless ng < tp).
        self.kv_replicas = self._replicated_kv.replicas
        self.kv_group_index = self._replicated_kv.group_index  # this rank's real group (ng < tp)
        # Groups in the (global) fused layout: the real groups, or one per rank when replicated.
        self.num_layout_groups = max(groups, tp)

    def _build_input_projection(self, builder: ColumnParallelLinearBuilder, output_size: int,
                                tp_comm_buffer_name: str) -> ColumnParallelLinearInterface:
        """A column-parallel projection of the layer input to `output_size` (queries/keys/values)."""
        config = self.config
        return builder(
            config.hidden_size,
            output_size,
            config=config,
            init_method=init_method_normal(config.init_method_std),
            bias=config.add_bias_linear or config.add_qkv_bias,
            gather_output=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name=tp_comm_buffer_name,
            tp_group=self.pg.tp,
        )

    def _build_shared_slots(self, *, q_layernorm: LayerNormBuilder | None,
                            k_layernorm: LayerNormBuilder | None,
                            core_attention: CoreAttentionBuilder,
                            linear_proj: RowParallelLinearBuilder) -> None:
        """The slots after the input projections: q/k norms, core attention, output projection."""
        self.q_layernorm = self._build_norm(q_layernorm)
        self.k_layernorm = self._build_norm(k_layernorm)
        self.core_attention = self._build_core_attention(core_attention)
        self.linear_proj = self._build_linear_proj(linear_proj)

    def _build_core_attention(self, builder: CoreAttentionBuilder) -> CoreAttentionInterface:
        return builder(
            self.config,
            layer_number=self.layer_number,
            attn_mask_type=self.attn_mask_type,
            attention_type=self.attention_type,
            attention_dropout=None,  # the core reads config.attention_dropout
            softmax_scale=None,  # the core reads config.softmax_scale (default 1/sqrt(hn))
            pg=self.pg,
            window_size=self.window_size,
        )

    def _build_linear_proj(self, builder: RowParallelLinearBuilder) -> RowParallelLinearInterface:
        config = self.config
        return builder(
            self.query_projection_size,
            config.hidden_size,
            config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.pg.tp,
        )

    def _build_norm(self, builder: LayerNormBuilder | None) -> LayerNormInterface | None:
        if builder is None:
            return None
        norm = builder(self.hidden_size_per_attention_head, config=self.config,
                       eps=self.config.layernorm_epsilon)
        if self.pg.tp_size > 1 and isinstance(norm, nn.Module):
            # One per-head norm serves this rank's heads only: its gradient is a partial sum
            # over heads, completed over the tensor-parallel group by finalize_model_grads.
            mark_partial_grad_over_tp(norm)
        return norm

    def _check_input(self, name: str, tensor: Tensor) -> None:
        expected = self.config.hidden_size
        if tensor.dim() != 3 or tensor.shape[-1] != expected:
            raise ValueError(f"{type(self).__name__}.forward: {name} has shape {tuple(tensor.shape)}, "
                             f"expected [sequence, batch, {expected}] (config.hidden_size="
                             f"{expected}; given last dimension "
                             f"{tensor.shape[-1] if tensor.dim() else None})")

    def _check_mask(self, mask: Tensor | None, batch: int, sq: int, sk: int) -> None:
        # Checked here, before any projection, so a wrong shape fails with the layer's sizes.
        if mask is not None:
            check_mask(mask, (batch, self.num_attention_heads_per_partition, sq, sk))

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                mask_type: AttnMaskType) -> tuple[Tensor, Tensor | None]:
        """Core attention then the output projection: `[sq, b, np, hn]` -> (`[sq, b, h]`, bias)."""
        sq, batch = query.shape[0], query.shape[1]
        self._check_mask(mask, batch, sq, key.shape[0])
        core = apply_module(self.core_attention)
        if self.config.recompute_granularity == "selective" and self.training \
                and torch.is_grad_enabled():
            # Selective recomputation: keep q, k, v but not the core's internals (softmax
            # statistics, dropout masks); rerun it in backward, RNG streams replayed.
            context = _checkpoint(core, query, key, value, mask, attn_mask_type=mask_type,
                                  use_reentrant=False, context_fn=checkpoint_rng_context_fn())
            assert isinstance(context, Tensor)
        else:
            context = core(query, key, value, mask, attn_mask_type=mask_type)  # [sq, b, np * hn]
        return apply_module(self.linear_proj)(context)  # ([sq, b, h], bias or None)

    # Built in the subclasses' __init__ through the helpers above.
    core_attention: CoreAttentionInterface
    linear_proj: RowParallelLinearInterface

    @abc.abstractmethod
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        key_value_states: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`[s, b, h]` -> (`[s, b, h]`, the output projection's bias or None)."""

    def backward_dw(self) -> None:
        """Compute the deferred weight gradients of the projections (`config.delay_wgrad_compute`)."""
        self.linear_proj.backward_dw()
