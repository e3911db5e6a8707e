"""Self- and cross-attention layers with typed slots, tensor parallelism and a KV cache.

Fused QKV layout (Megatron-Core's, which checkpoint conversion targets): the output features
of `linear_qkv` are grouped by query group. With `np` heads, `ng` query groups and head size
`hn`, the weight has `ng * (np/ng + 2) * hn` rows ordered

    for each group g:  [ the np/ng query heads of g | the key head of g | the value head of g ]

each head `hn` rows. A column-parallel split over `tp` ranks then hands each rank whole
groups. When `ng < tp` (more ranks than key/value heads) each key/value head is *replicated*:
the layout is the one above for `max(ng, tp)` groups, group `g` of the real model appearing
`tp / ng` times, each copy followed by the `np / tp` query heads one rank holds. The copies
start equal (rank-first copy wins at construction) and their weight gradients are summed
over the ranks that share them, so they stay equal. With `tp = 1` both layouts coincide.

Cross-attention's `linear_kv` uses the same grouping without queries: `[key of g | value of g]`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

from protoformer.config import TransformerConfig
from protoformer.kernels.rope import fused_apply_rotary_pos_emb
from protoformer.parallel.grads import mark_duplicate_rows, mark_partial_grad_over_tp
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    ColumnParallelLinearInterface,
    RowParallelLinearBuilder,
    RowParallelLinearInterface,
)
from protoformer.parallel.random import checkpoint_rng_context_fn
from protoformer.spec import Submodules, apply_module
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import (
    AttentionTypeName,
    CoreAttentionBuilder,
    CoreAttentionInterface,
)
from protoformer.transformer.masks import check_mask
from protoformer.transformer.mlp import init_method_normal, scaled_init_method_normal
from protoformer.transformer.norm import LayerNormBuilder, LayerNormInterface
from protoformer.transformer.rope import apply_rotary_pos_emb

# torch leaves checkpoint's `function` parameter unannotated; this is the type we call it with.
_checkpoint = cast("Callable[..., object]", torch_checkpoint.checkpoint)  # pyright: ignore[reportUnknownMemberType]

__all__ = [
    "Attention",
    "CoreAttentionBuilder",
    "CoreAttentionInterface",
    "CrossAttention",
    "CrossAttentionSubmodules",
    "LinearInterface",
    "LinearLayerBuilder",
    "LinearProjBuilder",
    "LinearProjInterface",
    "LinearQkvBuilder",
    "LinearQkvInterface",
    "SelfAttention",
    "SelfAttentionSubmodules",
]

# Slot names are aliases of the general layer kinds: a backend's column-parallel linear fills
# every column slot, its row-parallel linear every row slot.
LinearQkvBuilder = ColumnParallelLinearBuilder
LinearQkvInterface = ColumnParallelLinearInterface
LinearLayerBuilder = ColumnParallelLinearBuilder  # cross-attention's linear_q / linear_kv
LinearInterface = ColumnParallelLinearInterface
LinearProjBuilder = RowParallelLinearBuilder
LinearProjInterface = RowParallelLinearInterface


@dataclass
class SelfAttentionSubmodules(Submodules):
    """The slots of `SelfAttention`; the q/k norms are per head (over `kv_channels`)."""

    linear_qkv: LinearQkvBuilder
    core_attention: CoreAttentionBuilder
    linear_proj: LinearProjBuilder
    q_layernorm: LayerNormBuilder | None = None
    k_layernorm: LayerNormBuilder | None = None


@dataclass
class CrossAttentionSubmodules(Submodules):
    """The slots of `CrossAttention`: queries from the layer input, keys/values from memory."""

    linear_q: LinearLayerBuilder
    linear_kv: LinearLayerBuilder
    core_attention: CoreAttentionBuilder
    linear_proj: LinearProjBuilder
    q_layernorm: LayerNormBuilder | None = None
    k_layernorm: LayerNormBuilder | None = None


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
        tp, rank = self.pg.tp_size, self.pg.tp_rank
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
        # Each key/value head is held by `kv_replicas` ranks (1 unless ng < tp).
        self.kv_replicas = max(1, tp // groups)
        self.num_query_groups_per_partition = max(1, groups // tp)
        self.kv_group_index = rank // self.kv_replicas  # the real group of this rank (ng < tp)
        # Groups in the (global) fused layout: the real groups, or one per rank when replicated.
        self.num_layout_groups = max(groups, tp)
        # Replicated key/value parameters and the row where their key/value part starts.
        self._tied_kv_params: list[tuple[nn.Parameter, int]] = []

    def _build_core_attention(self, builder: CoreAttentionBuilder) -> CoreAttentionInterface:
        return builder(
            self.config,
            layer_number=self.layer_number,
            attn_mask_type=self.attn_mask_type,
            attention_type=self.attention_type,
            attention_dropout=None,  # the core reads config.attention_dropout
            softmax_scale=None,  # the core reads config.softmax_scale (default 1/sqrt(hn))
            pg=self.pg,
        )

    def _build_linear_proj(self, builder: LinearProjBuilder) -> LinearProjInterface:
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

    def _tie_replicated_kv(self, linear: ColumnParallelLinearInterface, rows: int,
                           kv_offset: int) -> None:
        """Keep the replicated key/value rows of `linear` equal on the ranks sharing them.

        `rows` is the per-rank output size of `linear`; rows `kv_offset:` hold keys/values.
        Applies to every parameter whose first dimension is `rows` (weight and bias): the
        first copy's values are broadcast now, and each gradient is summed over the copies
        (by a hook in backward, or in `backward_dw` for deferred weight gradients).
        """
        if self.kv_replicas == 1:
            return
        if not isinstance(linear, nn.Module):
            raise TypeError(f"{type(linear).__qualname__} is not a torch.nn.Module")
        for param in linear.parameters():
            if param.dim() == 0 or param.shape[0] != rows:
                continue
            with torch.no_grad():
                kv = param[kv_offset:]
                kv.copy_(self._sum_over_replicas(kv, first_copy_only=True))
            if self.pg.tp_rank % self.kv_replicas != 0:
                mark_duplicate_rows(param, kv_offset)  # counted once in a global grad norm
            hook = self._make_kv_grad_hook(kv_offset)
            param.register_hook(hook)  # type: ignore[no-untyped-call]  # pyright: ignore[reportUnknownMemberType]  # torch leaves it unannotated
            self._tied_kv_params.append((param, kv_offset))

    def _backward_dw_tied(self, linear: ColumnParallelLinearInterface) -> None:
        """`linear.backward_dw()`, then sum the new key/value gradient rows over the copies."""
        before = [(param, offset, None if param.grad is None else param.grad[offset:].clone())
                  for param, offset in self._tied_kv_params]
        linear.backward_dw()
        with torch.no_grad():
            for param, offset, old in before:
                if param.grad is None:
                    continue
                new = param.grad[offset:] if old is None else param.grad[offset:] - old
                summed = self._sum_over_replicas(new, first_copy_only=False)
                param.grad[offset:] = summed if old is None else old + summed

    def _make_kv_grad_hook(self, kv_offset: int) -> Callable[[Tensor | None], Tensor | None]:
        def hook(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # deferred to backward_dw (`delay_wgrad_compute`)
                return None
            grad = grad.clone()
            grad[kv_offset:] = self._sum_over_replicas(grad[kv_offset:], first_copy_only=False)
            return grad

        return hook

    def _sum_over_replicas(self, tensor: Tensor, *, first_copy_only: bool) -> Tensor:
        """Sum `tensor` over the ranks holding the same key/value group (or take the first copy)."""
        groups = self.config.query_groups
        buffer = tensor.new_zeros((groups, *tensor.shape))  # [ng, ...]
        if not first_copy_only or self.pg.tp_rank % self.kv_replicas == 0:
            buffer[self.kv_group_index] = tensor
        all_reduce_in_place(buffer, self.pg.tp)
        return buffer[self.kv_group_index]

    def _check_input(self, name: str, tensor: Tensor) -> None:
        expected = self.config.hidden_size
        if tensor.dim() != 3 or tensor.shape[-1] != expected:
            raise ValueError(f"{type(self).__name__}.forward: {name} has shape {tuple(tensor.shape)}, "
                             f"expected [sequence, batch, {expected}] (config.hidden_size="
                             f"{expected}; given last dimension "
                             f"{tensor.shape[-1] if tensor.dim() else None})")

    def _check_mask(self, mask: Tensor | None, batch: int, sq: int, sk: int) -> None:
        # Checked even where the mask type ignores it (causal): a wrong shape is a bug either way.
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
    linear_proj: LinearProjInterface

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


class SelfAttention(Attention):
    """Multi-head self-attention (MHA, GQA and MQA through `config.num_query_groups`).

    One fused column-parallel projection makes queries, keys and values (the grouped layout
    in the module docstring); optional per-head q/k norms; rotary embedding of q and k; core
    attention; row-parallel output projection. `forward(hidden_states [s, b, h])` returns
    (`[s, b, h]`, the projection's bias or None, left for a fused residual add).

    `rotary_pos_emb` is the model's rotary table `[>= offset + s, 1, 1, rot_dim]` starting
    at position 0; the layer uses positions `[offset, offset + s)`, where `offset` is
    `inference_context.sequence_len_offset` (0 without a context). With an
    `inference_context` the layer stores the new keys/values in its cache (allocated on
    first use under `layer_number`) and attends over all cached positions, the causal mask
    aligned so the last query sees every key; the caller advances the offset afterwards.

    Masks follow the core attention's rules: with `attn_mask_type=causal` the
    `attention_mask` argument is not applied (it is still shape-checked); use `padding_causal`
    to combine a padding mask with causality, `padding` / `arbitrary` for a mask alone.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        *,
        pg: ProcessGroups | None = None,
    ) -> None:
        super().__init__(config, layer_number, attn_mask_type, "self", pg=pg)
        if not isinstance(submodules, SelfAttentionSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"SelfAttention expects submodules=SelfAttentionSubmodules(...), got "
                            f"{type(submodules).__qualname__}")
        hn = self.hidden_size_per_attention_head
        heads, layout_groups = config.num_attention_heads, self.num_layout_groups
        # Query heads per key/value head on this rank (np/ng, or np/tp when replicated).
        self.heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        qkv_size = (heads + 2 * layout_groups) * hn  # layout_groups * (np/layout_groups + 2) * hn
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size,
            qkv_size,
            config=config,
            init_method=init_method_normal(config.init_method_std),
            bias=config.add_bias_linear or config.add_qkv_bias,
            gather_output=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.pg.tp,
        )
        self._tie_replicated_kv(self.linear_qkv, rows=qkv_size // self.pg.tp_size,
                                kv_offset=self.num_attention_heads_per_partition * hn)
        self.q_layernorm = self._build_norm(submodules.q_layernorm)
        self.k_layernorm = self._build_norm(submodules.k_layernorm)
        self.core_attention = self._build_core_attention(submodules.core_attention)
        self.linear_proj = self._build_linear_proj(submodules.linear_proj)

    def get_query_key_value_tensors(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`[s, b, h]` -> query `[s, b, np, hn]`, key and value `[s, b, ng, hn]` (this rank's heads)."""
        mixed, bias = apply_module(self.linear_qkv)(hidden_states)  # [s, b, ng * (np/ng + 2) * hn]
        if bias is not None:
            mixed = mixed + bias
        s, batch = mixed.shape[0], mixed.shape[1]
        groups, per_group = self.num_query_groups_per_partition, self.heads_per_group
        hn = self.hidden_size_per_attention_head
        expected = groups * (per_group + 2) * hn
        if mixed.shape[-1] != expected:
            raise ValueError(f"linear_qkv returned {mixed.shape[-1]} features per rank, expected "
                             f"{expected} (= {groups} groups x ({per_group} + 2) heads x {hn})")
        mixed = mixed.view(s, batch, groups, per_group + 2, hn)  # [s, b, ng, np/ng + 2, hn]
        query = mixed[:, :, :, :per_group].reshape(s, batch, groups * per_group, hn)  # [s, b, np, hn]
        key = mixed[:, :, :, per_group]  # [s, b, ng, hn]
        value = mixed[:, :, :, per_group + 1]  # [s, b, ng, hn]
        if self.q_layernorm is not None:
            query = apply_module(self.q_layernorm)(query)
        if self.k_layernorm is not None:
            key = apply_module(self.k_layernorm)(key)
        return query, key, value

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
        self._check_input("hidden_states", hidden_states)
        if key_value_states is not None:
            raise ValueError("SelfAttention takes its keys and values from hidden_states, but "
                             "key_value_states was given; use CrossAttention to attend to "
                             "another sequence")
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        s = query.shape[0]  # the full sequence, also under sequence parallelism
        offset = inference_context.sequence_len_offset if inference_context is not None else 0
        if rotary_pos_emb is not None:
            freqs = _rotary_positions(rotary_pos_emb, offset, s, self.hidden_size_per_attention_head)
            interleaved = self.config.rotary_interleaved
            # `apply_rope_fusion`: one Triton kernel per tensor on CUDA (same math elsewhere).
            rotate = fused_apply_rotary_pos_emb if self.config.apply_rope_fusion \
                else apply_rotary_pos_emb
            query = rotate(query, freqs, rotary_interleaved=interleaved)  # [s, b, np, hn]
            key = rotate(key, freqs, rotary_interleaved=interleaved)  # [s, b, ng, hn]
        if inference_context is not None:
            # The core's causal mask is bottom-right aligned, so the s new queries at
            # [offset, offset + s) see exactly the keys at or before their own positions.
            key, value = self._update_kv_cache(inference_context, key, value)  # [offset + s, b, ng, hn]
        return self._attend(query, key, value, attention_mask, self.attn_mask_type)

    def _update_kv_cache(self, context: InferenceContext, key: Tensor,
                         value: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values at `[offset, offset + s)`; return all of `[0, offset + s)`."""
        s, batch = key.shape[0], key.shape[1]
        context.check_room(s)
        if batch > context.max_batch_size:
            raise ValueError(f"a batch of {batch} exceeds the InferenceContext's max_batch_size="
                             f"{context.max_batch_size}")
        cache = context.key_value_memory_dict.get(self.layer_number)
        if cache is None:
            shape = (context.max_sequence_length, context.max_batch_size,
                     self.num_query_groups_per_partition, self.hidden_size_per_attention_head)
            cache = (key.new_zeros(shape), value.new_zeros(shape))  # [max_s, max_b, ng, hn] each
            context.key_value_memory_dict[self.layer_number] = cache
        if len(cache) != 2:
            raise ValueError(f"InferenceContext entry {self.layer_number} holds {len(cache)} "
                             "tensors, not a key/value pair: two layers share a layer_number")
        key_cache, value_cache = cache
        start, end = context.sequence_len_offset, context.sequence_len_offset + s
        key_cache[start:end, :batch] = key
        value_cache[start:end, :batch] = value
        return key_cache[:end, :batch], value_cache[:end, :batch]

    def backward_dw(self) -> None:
        """Compute the deferred weight gradients of both projections."""
        self._backward_dw_tied(self.linear_qkv)
        super().backward_dw()


class CrossAttention(Attention):
    """Attention from a sequence (`hidden_states`) to a memory (`key_value_states`), e.g. an encoder's.

    Queries come from `linear_q`, keys and values from `linear_kv` (per key/value group:
    `[key | value]`). No causal mask by default; pass a padding mask `[b, 1, sq, sk]` to hide
    memory padding. With an `inference_context`, the projected memory is computed once and
    kept under `-layer_number` (apart from self-attention's cache of the same layer); call
    `inference_context.reset()` before decoding against another memory.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: CrossAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.no_mask,
        *,
        pg: ProcessGroups | None = None,
    ) -> None:
        super().__init__(config, layer_number, attn_mask_type, "cross", pg=pg)
        if not isinstance(submodules, CrossAttentionSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"CrossAttention expects submodules=CrossAttentionSubmodules(...), got "
                            f"{type(submodules).__qualname__}")
        hn = self.hidden_size_per_attention_head
        init_method = init_method_normal(config.init_method_std)
        bias = config.add_bias_linear or config.add_qkv_bias
        self.linear_q = submodules.linear_q(
            config.hidden_size, self.query_projection_size, config=config,
            init_method=init_method, bias=bias, gather_output=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="q", tp_group=self.pg.tp)
        kv_size = self.num_layout_groups * 2 * hn
        self.linear_kv = submodules.linear_kv(
            config.hidden_size, kv_size, config=config,
            init_method=init_method, bias=bias, gather_output=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="kv", tp_group=self.pg.tp)
        self._tie_replicated_kv(self.linear_kv, rows=kv_size // self.pg.tp_size, kv_offset=0)
        self.q_layernorm = self._build_norm(submodules.q_layernorm)
        self.k_layernorm = self._build_norm(submodules.k_layernorm)
        self.core_attention = self._build_core_attention(submodules.core_attention)
        self.linear_proj = self._build_linear_proj(submodules.linear_proj)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        key_value_states: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`[sq, b, h]` attending to `key_value_states [sk, b, h]` -> (`[sq, b, h]`, bias or None)."""
        self._check_input("hidden_states", hidden_states)
        if rotary_pos_emb is not None:
            raise ValueError("CrossAttention applies no rotary embedding (query and memory "
                             "positions are unrelated); pass rotary_pos_emb=None")
        mixed, bias = apply_module(self.linear_q)(hidden_states)  # [sq, b, np * hn]
        if bias is not None:
            mixed = mixed + bias
        s, batch = mixed.shape[0], mixed.shape[1]
        query = mixed.view(s, batch, self.num_attention_heads_per_partition,
                           self.hidden_size_per_attention_head)  # [sq, b, np, hn]
        if self.q_layernorm is not None:
            query = apply_module(self.q_layernorm)(query)
        key, value = self._memory_key_value(key_value_states, inference_context)  # [sk, b, ng, hn]
        if key.shape[1] != batch:
            raise ValueError(f"key_value_states has batch size {key.shape[1]} but hidden_states "
                             f"has {batch}")
        return self._attend(query, key, value, attention_mask, self.attn_mask_type)

    def _memory_key_value(self, key_value_states: Tensor | None,
                          context: InferenceContext | None) -> tuple[Tensor, Tensor]:
        cache_key = -self.layer_number
        if context is not None and cache_key in context.key_value_memory_dict:
            key, value = context.key_value_memory_dict[cache_key]
            return key, value
        if key_value_states is None:
            raise ValueError("CrossAttention needs key_value_states, the memory [sk, b, h] to "
                             "attend to")
        self._check_input("key_value_states", key_value_states)
        mixed, bias = apply_module(self.linear_kv)(key_value_states)  # [sk, b, ng * 2 * hn]
        if bias is not None:
            mixed = mixed + bias
        sk, batch = mixed.shape[0], mixed.shape[1]
        mixed = mixed.view(sk, batch, self.num_query_groups_per_partition, 2,
                           self.hidden_size_per_attention_head)  # [sk, b, ng, 2, hn]
        key, value = mixed[:, :, :, 0], mixed[:, :, :, 1]  # [sk, b, ng, hn] each
        if self.k_layernorm is not None:
            key = apply_module(self.k_layernorm)(key)
        if context is not None:
            context.key_value_memory_dict[cache_key] = (key, value)
        return key, value

    def backward_dw(self) -> None:
        """Compute the deferred weight gradients of the three projections."""
        self.linear_q.backward_dw()
        self._backward_dw_tied(self.linear_kv)
        super().backward_dw()


def _rotary_positions(table: Tensor, offset: int, s: int, head_dim: int) -> Tensor:
    """Rows `[offset, offset + s)` of a rotary table `[positions, 1, 1, rot_dim]`."""
    if table.dim() != 4 or table.shape[1] != 1 or table.shape[2] != 1:
        raise ValueError(f"rotary_pos_emb has shape {tuple(table.shape)}; expected the table "
                         "[positions, 1, 1, rot_dim] that RotaryEmbedding builds")
    if table.shape[-1] > head_dim:
        raise ValueError(f"rotary_pos_emb rotates {table.shape[-1]} features but a head has "
                         f"{head_dim} (kv_channels); build the table for rotary_percent <= 1")
    needed = offset + s
    if table.shape[0] < needed:
        raise ValueError(f"rotary_pos_emb covers {table.shape[0]} positions but this forward "
                         f"needs positions [{offset}, {needed}); build the rotary table with "
                         f"max_seq_len >= {needed}")
    return table[offset:needed]  # [s, 1, 1, rot_dim]

