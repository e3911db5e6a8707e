"""Self- and cross-attention layers with typed slots, tensor parallelism and a KV cache.

Their shared base `Attention` (head split, shared slots, core attention and output
projection) lives in `protoformer.transformer.attention_base` and is re-exported here.

Fused QKV layout (Megatron-Core's, which checkpoint conversion targets): the output features
of `linear_qkv` are grouped by query group. With `np` heads, `ng` query groups and head size
`hn`, the weight has `ng * (np/ng + 2) * hn` rows ordered

    for each group g:  [ the np/ng query heads of g | the key head of g | the value head of g ]

each head `hn` rows. A column-parallel split over `tp` ranks then hands each rank whole
groups. When `ng < tp` (more ranks than key/value heads) each key/value head is *replicated*:
the layout is the one above for `max(ng, tp)` groups, group `g` of the real model appearing
`tp / ng` times, each copy followed by the `np / tp` query heads one rank holds. The copies
start equal (rank-first copy wins at construction) and their weight gradients are summed
over the ranks that share them, so they stay equal (`protoformer.transformer.kv_replication`).
With `tp = 1` both layouts coincide.

Cross-attention's `linear_kv` uses the same grouping without queries: `[key of g | value of g]`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.kernels.rope import fused_apply_rotary_pos_emb_pair
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    ColumnParallelLinearInterface,
    RowParallelLinearBuilder,
    RowParallelLinearInterface,
)
from protoformer.spec import Submodules, apply_module
from protoformer.transformer.attention_base import Attention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import CoreAttentionBuilder, CoreAttentionInterface
from protoformer.transformer.kv_cache import (
    append_to_kv_cache,
    append_to_window_cache,
    cached_memory,
    store_memory,
    write_kv_cache_at_positions,
)
from protoformer.transformer.masks import check_window_size
from protoformer.transformer.norm import LayerNormBuilder
from protoformer.transformer.rope import RotaryEmbedding, apply_rotary_pos_emb

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

    Masks follow the core attention's rules: `causal` (and `padding_causal`) combine a given
    `attention_mask` (e.g. padding) with causality, `padding` / `arbitrary` apply the mask
    alone, `no_mask` applies nothing.

    `window_size=W` makes the layer sliding-window attention: the core attention is built with
    the window (each query sees the `W` keys ending at its position), and when decoding the
    layer keeps only the last `W` positions' keys/values (`kv_cache.append_to_window_cache`),
    so its cache stops growing. A recipe sets it per layer, e.g.
    `partial(SelfAttention, submodules=..., window_size=4096)`.

    `rotary_base=B` gives the layer a rotary table of its own with base `B` (no scaling; the
    config's head size, rotary fraction and layout), used in place of the model's table over
    the same positions: Gemma 3's sliding layers rotate with `rope_local_base_freq` while its
    global layers use the model's table.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        *,
        pg: ProcessGroups | None = None,
        window_size: int | None = None,
        rotary_base: float | None = None,
    ) -> None:
        super().__init__(config, layer_number, attn_mask_type, "self", pg=pg)
        _require_submodules("SelfAttention", submodules, SelfAttentionSubmodules)
        self.window_size = check_window_size(window_size, owner="SelfAttention")
        self.rotary_pos_emb: RotaryEmbedding | None = None
        if rotary_base is not None:
            number = isinstance(rotary_base, (int, float)) and not isinstance(rotary_base, bool)  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            if not number or not math.isfinite(rotary_base) or not rotary_base > 0.0:
                raise ValueError(f"SelfAttention(rotary_base={rotary_base!r}): must be a finite "
                                 "number > 0, or None to use the model's rotary table")
            self.rotary_pos_emb = self._own_rotary_table(float(rotary_base))
        hn = self.hidden_size_per_attention_head
        heads, layout_groups = config.num_attention_heads, self.num_layout_groups
        # Query heads per key/value head on this rank (np/ng, or np/tp when replicated).
        self.heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        qkv_size = (heads + 2 * layout_groups) * hn  # layout_groups * (np/layout_groups + 2) * hn
        self.linear_qkv = self._build_input_projection(submodules.linear_qkv, qkv_size, "qkv")
        self._replicated_kv.tie(self.linear_qkv, rows=qkv_size // self.pg.tp_size,
                                kv_offset=self.num_attention_heads_per_partition * hn)
        self._build_shared_slots(q_layernorm=submodules.q_layernorm,
                                 k_layernorm=submodules.k_layernorm,
                                 core_attention=submodules.core_attention,
                                 linear_proj=submodules.linear_proj)

    def _own_rotary_table(self, base: float) -> RotaryEmbedding:
        config = self.config
        return RotaryEmbedding(config.head_dim, rotary_percent=config.rotary_percent,
                               rotary_interleaved=config.rotary_interleaved, rotary_base=base)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Refill this layer's own rotary table, if it has one (`to_empty` leaves the buffer
        uninitialised; the model's `init_weights` runs this)."""
        if self.rotary_pos_emb is not None:
            fresh = self._own_rotary_table(self.rotary_pos_emb.rotary_base)
            self.rotary_pos_emb.inv_freq.copy_(fresh.inv_freq)

    def get_query_key_value_tensors(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`[s, b, h]` -> query `[s, b, np, hn]`, key and value `[s, b, ng, hn]` (this rank's heads)."""
        mixed = _project(self.linear_qkv, hidden_states)  # [s, b, ng * (np/ng + 2) * hn]
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
        static = inference_context is not None and inference_context.positions is not None
        if static and attention_mask is not None:
            raise ValueError("static-shape decoding (InferenceContext.positions) builds its own "
                             "mask from the positions; pass attention_mask=None")
        if rotary_pos_emb is not None and self.rotary_pos_emb is not None:
            # This layer's own base, over the positions of the model's table.
            rotary_pos_emb = apply_module(self.rotary_pos_emb)(rotary_pos_emb.shape[0])
        if rotary_pos_emb is not None:
            hn = self.hidden_size_per_attention_head
            freqs = _rotary_positions(rotary_pos_emb, offset, s, hn)  # [s, 1, 1, rot]
            if inference_context is not None and static:
                # Each row at its own position: angles [s, b, 1, rot].
                freqs = inference_context.rotary_rows(rotary_pos_emb, s)
            query, key = self._rotate(query, key, freqs)
        if inference_context is not None and static:
            # Static shapes: the whole cache, later positions blocked (the mask replaces the
            # causal rule, which would align to the cache's end); a sliding window also
            # blocks the keys `window_size` or more positions back.
            key, value = write_kv_cache_at_positions(
                inference_context, self.layer_number, key, value,
                num_query_groups=self.num_query_groups_per_partition,
                head_dim=self.hidden_size_per_attention_head)  # [max_s, b, ng, hn]
            blocked = inference_context.decode_mask(s, window=self.window_size)  # [b, 1, s, max_s]
            return self._attend(query, key, value, blocked, AttnMaskType.arbitrary)
        if inference_context is not None and self.window_size is not None \
                and inference_context.roll_window_caches:
            # Only the last `window` positions are kept: the keys are those of positions
            # [offset - kept, offset + s), so a mask over every position keeps its tail.
            key, value = append_to_window_cache(
                inference_context, self.layer_number, key, value, window=self.window_size,
                num_query_groups=self.num_query_groups_per_partition,
                head_dim=self.hidden_size_per_attention_head)  # [kept + s, b, ng, hn]
            if attention_mask is not None and attention_mask.shape[-1] == offset + s:
                attention_mask = attention_mask[..., offset + s - key.shape[0]:]
        elif inference_context is not None:
            # The core's causal mask is bottom-right aligned, so the s new queries at
            # [offset, offset + s) see exactly the keys at or before their own positions.
            key, value = append_to_kv_cache(
                inference_context, self.layer_number, key, value,
                num_query_groups=self.num_query_groups_per_partition,
                head_dim=self.hidden_size_per_attention_head)  # [offset + s, b, ng, hn]
        return self._attend(query, key, value, attention_mask, self.attn_mask_type)

    def _rotate(self, query: Tensor, key: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary embedding of query `[s, b, np, hn]` and key `[s, b, ng, hn]` by `freqs`
        `[s, 1 | b, 1, rot]`; `config.apply_rope_fusion` uses one Triton kernel per tensor
        on CUDA (same math elsewhere, cos/sin computed once for both), which takes one
        angle row per position."""
        interleaved = self.config.rotary_interleaved
        mscale = self.config.rope_attention_factor  # LongRoPE scales cos and sin
        plain = functools.partial(apply_rotary_pos_emb, mscale=mscale)
        # The fused kernel has no mscale: it serves the unscaled tables only.
        fused = self.config.apply_rope_fusion and mscale == 1.0
        if freqs.shape[1] != 1 and freqs.shape[0] == 1:
            # One token per row at its own position (static decoding): swap the unit sequence
            # dim with the batch, so each row is a position of its own (views, no copies).
            angles = freqs.transpose(0, 1)  # [b, 1, 1, rot]
            query, key = query.transpose(0, 1), key.transpose(0, 1)  # [b, 1, n, hn]
            if fused:
                query, key = fused_apply_rotary_pos_emb_pair(query, key, angles,
                                                             rotary_interleaved=interleaved)
            else:
                query = plain(query, angles, rotary_interleaved=interleaved)
                key = plain(key, angles, rotary_interleaved=interleaved)
            return query.transpose(0, 1), key.transpose(0, 1)
        if fused and freqs.shape[1] == 1:
            return fused_apply_rotary_pos_emb_pair(query, key, freqs,
                                                   rotary_interleaved=interleaved)
        # Per-row angles of several positions (or no fusion, or a scaled table): plain math.
        return (plain(query, freqs, rotary_interleaved=interleaved),  # [s, b, np, hn]
                plain(key, freqs, rotary_interleaved=interleaved))  # [s, b, ng, hn]

    def backward_dw(self) -> None:
        """Compute the deferred weight gradients of both projections."""
        self._replicated_kv.backward_dw(self.linear_qkv)
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
        _require_submodules("CrossAttention", submodules, CrossAttentionSubmodules)
        self.linear_q = self._build_input_projection(submodules.linear_q,
                                                     self.query_projection_size, "q")
        kv_size = self.num_layout_groups * 2 * self.hidden_size_per_attention_head
        self.linear_kv = self._build_input_projection(submodules.linear_kv, kv_size, "kv")
        self._replicated_kv.tie(self.linear_kv, rows=kv_size // self.pg.tp_size, kv_offset=0)
        self._build_shared_slots(q_layernorm=submodules.q_layernorm,
                                 k_layernorm=submodules.k_layernorm,
                                 core_attention=submodules.core_attention,
                                 linear_proj=submodules.linear_proj)

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
        mixed = _project(self.linear_q, hidden_states)  # [sq, b, np * hn]
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
        cached = cached_memory(context, self.layer_number)
        if cached is not None:
            return cached
        if key_value_states is None:
            raise ValueError("CrossAttention needs key_value_states, the memory [sk, b, h] to "
                             "attend to")
        self._check_input("key_value_states", key_value_states)
        mixed = _project(self.linear_kv, key_value_states)  # [sk, b, ng * 2 * hn]
        sk, batch = mixed.shape[0], mixed.shape[1]
        mixed = mixed.view(sk, batch, self.num_query_groups_per_partition, 2,
                           self.hidden_size_per_attention_head)  # [sk, b, ng, 2, hn]
        key, value = mixed[:, :, :, 0], mixed[:, :, :, 1]  # [sk, b, ng, hn] each
        if self.k_layernorm is not None:
            key = apply_module(self.k_layernorm)(key)
        if context is not None:
            store_memory(context, self.layer_number, key, value)
        return key, value

    def backward_dw(self) -> None:
        """Compute the deferred weight gradients of the three projections."""
        self.linear_q.backward_dw()
        self._replicated_kv.backward_dw(self.linear_kv)
        super().backward_dw()


def _require_submodules(layer: str, submodules: object, expected: type[Submodules]) -> None:
    if not isinstance(submodules, expected):
        raise TypeError(f"{layer} expects submodules={expected.__name__}(...), got "
                        f"{type(submodules).__qualname__}")


def _project(linear: LinearInterface, input_: Tensor) -> Tensor:
    """A column-parallel projection with its bias added: `[s, b, h]` -> `[s, b, out / tp]`."""
    output, bias = apply_module(linear)(input_)
    return output if bias is None else output + bias


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


