"""Multi-latent attention (MLA) of DeepSeek-V2/V3, every slot typed, with a latent KV cache.

Per token, the keys and values of all heads are generated from one compressed latent:

    c_kv, k_pe = split(kv_down(x))          # [kv_lora_rank], [qk_pos_emb_head_dim]
    k_nope, v  = split_per_head(kv_up(kv_norm(c_kv)))   # [np, qk_head_dim], [np, v_head_dim]
    k          = [k_nope | rope(k_pe)]       # rope part shared by every head
    q          = [q_nope | rope(q_pe)] = q_up(q_norm(q_down(x)))   (or q_proj(x))

Rotary embedding is *decoupled*: it touches only the `qk_pos_emb_head_dim` part of each head
(see `protoformer.transformer.yarn` for the table and the interleaved weight layout). The
softmax scale is `1 / sqrt(qk_head_dim + qk_pos_emb_head_dim)` with YaRN's correction.

The cache (with an `InferenceContext`) stores only the normalized latent `c_kv`
`[max_seq, max_b, kv_lora_rank]` and the rotated `k_pe` `[max_seq, max_b, qk_pos_emb_head_dim]`
per layer, instead of `np * (q_head_dim + v_head_dim)` values per token. Attention over the
cache uses the *absorbed* form: the key half of `kv_up`, `W_uk`, is folded into the query
(`q_nope @ W_uk` lives in latent space), scores are taken directly against `c_kv`, and the
value half `W_uv` is applied to the latent context before `linear_proj`. With
`config.cache_mla_latents=False` the cache holds the expanded per-head keys and values instead.

Tensor parallelism: heads are split over `pg.tp` (`np / tp` per rank); the down-projections
and their norms are replicated (`LinearBuilder`), the up-projections column-parallel and
`linear_proj` row-parallel. With `config.sequence_parallel` the down-projections and latent
norms run on this rank's slice of the sequence (their parameters are tagged
`sequence_parallel`, so their gradients are summed over ranks after backward); the
up-projections all-gather the sequence, and the shared rotary key part `k_pe` (and, for the
absorbed cache path, `c_kv`) is all-gathered explicitly.

Biases: the down-projections take `config.add_qkv_bias`, `linear_proj` takes
`config.add_bias_linear`; the direct `linear_q_proj` and the up-projections have none (as in
DeepSeek's checkpoints; it keeps the absorbed form a pure matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from protoformer.parallel.protocols import (
    ColumnParallelLinearBuilder,
    ColumnParallelLinearInterface,
    LinearBuilder,
    LinearLayerInterface,
    RowParallelLinearBuilder,
    RowParallelLinearInterface,
)
from protoformer.spec import SpecError, Submodules, apply_module
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import CoreAttentionBuilder, CoreAttentionInterface
from protoformer.transformer.mlp import init_method_normal, scaled_init_method_normal
from protoformer.transformer.norm import LayerNormBuilder, LayerNormInterface
from protoformer.transformer.yarn import (
    MLARotaryEmbedding,
    apply_interleaved_rotary,
    mla_softmax_scale,
)

__all__ = ["MLASelfAttentionSubmodules", "MLATransformerConfig", "MultiLatentAttention"]


@dataclass(kw_only=True)
class MLASelfAttentionSubmodules(Submodules):
    """The slots of `MultiLatentAttention`, each typed by a general layer kind.

    `linear_q_proj` serves `config.q_lora_rank=None` (queries projected directly); otherwise
    `linear_q_down_proj`, `q_layernorm` and `linear_q_up_proj` compress and expand them.
    A slot the config needs but that is None raises `SpecError` when the layer is built.
    """

    linear_q_proj: ColumnParallelLinearBuilder | None = None
    linear_q_down_proj: LinearBuilder | None = None
    linear_q_up_proj: ColumnParallelLinearBuilder | None = None
    linear_kv_down_proj: LinearBuilder
    linear_kv_up_proj: ColumnParallelLinearBuilder
    q_layernorm: LayerNormBuilder | None = None
    kv_layernorm: LayerNormBuilder
    core_attention: CoreAttentionBuilder
    linear_proj: RowParallelLinearBuilder


class _LinearLike(Protocol):
    """What MLA needs of any linear slot: `[s, b, in]` -> (`[s, b, out]`, bias or None)."""

    def forward(self, input_: Tensor, /) -> tuple[Tensor, Tensor | None]: ...


def _apply_linear(layer: _LinearLike, x: Tensor) -> Tensor:
    """Apply a linear slot built with `skip_bias_add=False`, adding a returned bias if any."""
    out, bias = apply_module(layer)(x)
    return out if bias is None else out + bias


class MultiLatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-latent self-attention: `[s, b, h]` -> (`[s, b, h]`, bias or None).

    `config` must be an `MLATransformerConfig` (typed `TransformerConfig` so that
    `partial(MultiLatentAttention, submodules=...)` fills any `AttentionBuilder` slot). The
    `rotary_pos_emb` argument of `forward` is ignored: MLA builds its own (possibly YaRN)
    table for the rotary part of its heads from the config.
    """

    linear_q_proj: ColumnParallelLinearInterface | None
    linear_q_down_proj: LinearLayerInterface | None
    linear_q_up_proj: ColumnParallelLinearInterface | None
    q_layernorm: LayerNormInterface | None
    linear_kv_down_proj: LinearLayerInterface
    linear_kv_up_proj: ColumnParallelLinearInterface
    kv_layernorm: LayerNormInterface
    core_attention: CoreAttentionInterface
    linear_proj: RowParallelLinearInterface

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        *,
        pg: ProcessGroups | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, MLATransformerConfig):
            raise TypeError(f"MultiLatentAttention needs an MLATransformerConfig (q_lora_rank, "
                            f"kv_lora_rank, ...), got {type(config).__qualname__}; build the "
                            "model config with protoformer.MLATransformerConfig")
        if not isinstance(submodules, MLASelfAttentionSubmodules):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise TypeError(f"MultiLatentAttention(submodules=...) expects an "
                            f"MLASelfAttentionSubmodules, got {type(submodules).__qualname__}")
        if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 1:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise ValueError(f"layer_number={layer_number!r}: layers are numbered from 1")
        self.config: MLATransformerConfig = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.pg = pg if pg is not None else ProcessGroups()
        tp = self.pg.tp_size
        heads = config.num_attention_heads
        if heads % tp != 0:
            raise ValueError(f"num_attention_heads={heads} must be divisible by the tensor-parallel "
                             f"size {tp} (MLA splits whole heads over ranks)")
        self.num_attention_heads_per_partition = heads // tp
        self.softmax_scale = mla_softmax_scale(config)
        _require_slots(config, submodules)
        self._build(config, submodules)
        self.rotary = MLARotaryEmbedding(config)

    def _build(self, config: MLATransformerConfig, sub: MLASelfAttentionSubmodules) -> None:
        hidden, heads = config.hidden_size, config.num_attention_heads
        init = init_method_normal(config.init_method_std)
        tp_group = self.pg.tp

        def column(builder: ColumnParallelLinearBuilder, in_size: int, out_size: int,
                   name: str) -> ColumnParallelLinearInterface:
            return builder(in_size, out_size, config=config, init_method=init, bias=False,
                           gather_output=False, skip_bias_add=False, is_expert=False,
                           tp_comm_buffer_name=name, tp_group=tp_group)

        def replicated(builder: LinearBuilder, in_size: int, out_size: int,
                       name: str) -> LinearLayerInterface:
            return builder(in_size, out_size, config=config, init_method=init,
                           bias=config.add_qkv_bias, skip_bias_add=False, is_expert=False,
                           tp_comm_buffer_name=name)

        self.linear_q_proj = None
        self.linear_q_down_proj = None
        self.linear_q_up_proj = None
        self.q_layernorm = None
        if config.q_lora_rank is None:
            assert sub.linear_q_proj is not None  # _require_slots
            self.linear_q_proj = column(sub.linear_q_proj, hidden, heads * config.q_head_dim,
                                        "q_proj")
        else:
            assert sub.linear_q_down_proj is not None and sub.q_layernorm is not None
            assert sub.linear_q_up_proj is not None  # _require_slots
            self.linear_q_down_proj = replicated(sub.linear_q_down_proj, hidden,
                                                 config.q_lora_rank, "q_down_proj")
            self.q_layernorm = sub.q_layernorm(config.q_lora_rank, config=config,
                                               eps=config.layernorm_epsilon)
            self.linear_q_up_proj = column(sub.linear_q_up_proj, config.q_lora_rank,
                                           heads * config.q_head_dim, "q_up_proj")
        self.linear_kv_down_proj = replicated(
            sub.linear_kv_down_proj, hidden, config.kv_lora_rank + config.qk_pos_emb_head_dim,
            "kv_down_proj")
        self.kv_layernorm = sub.kv_layernorm(config.kv_lora_rank, config=config,
                                             eps=config.layernorm_epsilon)
        self.linear_kv_up_proj = column(sub.linear_kv_up_proj, config.kv_lora_rank,
                                        heads * (config.qk_head_dim + config.v_head_dim),
                                        "kv_up_proj")
        self.core_attention = sub.core_attention(
            config, layer_number=self.layer_number, attn_mask_type=self.attn_mask_type,
            attention_type="self", attention_dropout=None, softmax_scale=self.softmax_scale,
            pg=self.pg, window_size=None)
        self.linear_proj = sub.linear_proj(
            heads * config.v_head_dim, hidden, config=config,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers),
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="proj", tp_group=tp_group)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        key_value_states: Tensor | None = None,
        rotary_pos_emb: Tensor | None = None,
        inference_context: InferenceContext | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`[s, b, h]` -> (`[s, b, h]`, `linear_proj`'s bias or None).

        With `inference_context`, the tokens sit at positions `sequence_len_offset ...`; their
        latents are written to this layer's cache and attention runs over the whole cache.
        """
        del rotary_pos_emb  # MLA rotates with its own table (MLARotaryEmbedding)
        if key_value_states is not None:
            raise ValueError("MultiLatentAttention is self-attention only; key_value_states must "
                             "be None")
        self._check_input(hidden_states)
        # Under sequence parallelism the input is this rank's [s / tp, b, h] slice; the
        # column-parallel up-projections gather the sequence, so queries cover all s tokens.
        sq = hidden_states.shape[0] * (self.pg.tp_size if self.config.sequence_parallel else 1)
        offset = 0
        if inference_context is not None:
            if inference_context.positions is not None:
                raise ValueError("MultiLatentAttention does not support static-shape decoding "
                                 "(InferenceContext.positions); decode with the KV-cache loop")
            inference_context.check_room(sq)
            offset = inference_context.sequence_len_offset
        positions = torch.arange(offset, offset + sq, device=hidden_states.device)  # [sq]
        cos, sin = self.rotary(positions)  # each [sq, rope / 2]
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # [sq, 1, 1, rope / 2]

        q_nope, q_pe = self._query(hidden_states, cos, sin)  # [sq, b, np, qk], [sq, b, np, rope]
        c_kv, k_pe = self._latent(hidden_states, cos, sin)  # [sq, b, r], [sq, b, rope]

        if inference_context is None:
            key, value = self._expand(c_kv, k_pe)  # [sq, b, np, qk + rope], [sq, b, np, v]
            query = torch.cat((q_nope, q_pe), dim=-1)  # [sq, b, np, qk + rope]
            context = self._core(query, key, value, attention_mask)  # [sq, b, np * v]
        elif self.config.cache_mla_latents:
            # Used directly by this rank's heads only (no column-parallel layer sums its gradient).
            c_kv = self._enter_head_parallel(c_kv)  # [sq, b, r]
            c_kv, k_pe = self._cached(inference_context, (c_kv, k_pe))  # [sk, b, r], [sk, b, rope]
            context = self._absorbed_attention(q_nope, q_pe, c_kv, k_pe, attention_mask)
        else:
            key, value = self._expand(c_kv, k_pe)  # [sq, b, np, qk + rope], [sq, b, np, v]
            key, value = self._cached(inference_context, (key, value))  # [sk, b, np, ...]
            query = torch.cat((q_nope, q_pe), dim=-1)  # [sq, b, np, qk + rope]
            context = self._core(query, key, value, attention_mask)  # [sq, b, np * v]
        return apply_module(self.linear_proj)(context)  # ([sq, b, h], bias or None)

    def _query(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Queries split into the no-position part and the rotated part."""
        config = self.config
        if self.linear_q_proj is not None:
            q = _apply_linear(self.linear_q_proj, x)  # [sq, b, np * (qk + rope)]
        else:
            assert self.linear_q_down_proj is not None and self.q_layernorm is not None
            assert self.linear_q_up_proj is not None  # built together in _build
            q_compressed = _apply_linear(self.linear_q_down_proj, x)  # [sq, b, q_lora_rank]
            q_compressed = apply_module(self.q_layernorm)(q_compressed)
            q = _apply_linear(self.linear_q_up_proj, q_compressed)  # [sq, b, np * (qk + rope)]
        sq, batch = q.shape[0], q.shape[1]  # the whole sequence, also under sequence parallelism
        q = q.view(sq, batch, self.num_attention_heads_per_partition, config.q_head_dim)
        q_nope, q_pe = torch.split(q, [config.qk_head_dim, config.qk_pos_emb_head_dim], dim=-1)
        return q_nope, apply_interleaved_rotary(q_pe, cos, sin)  # [sq, b, np, qk], [.., rope]

    def _latent(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The normalized compressed latent `c_kv` and the rotated shared key part `k_pe`."""
        config = self.config
        latent = _apply_linear(self.linear_kv_down_proj, x)  # [sq, b, r + rope]
        c_kv, k_pe = torch.split(latent, [config.kv_lora_rank, config.qk_pos_emb_head_dim],
                                 dim=-1)  # [sq, b, r], [sq, b, rope]
        c_kv = apply_module(self.kv_layernorm)(c_kv)  # [sq, b, r] ([sq / tp, b, r] with SP)
        k_pe = self._enter_head_parallel(k_pe)  # [sq, b, rope], the whole sequence
        k_pe = apply_interleaved_rotary(k_pe, cos[:, :, 0], sin[:, :, 0])  # [sq, b, rope]
        return c_kv, k_pe

    def _enter_head_parallel(self, x: Tensor) -> Tensor:
        """A replicated-layer output that each rank uses for its own heads only.

        Its gradient is summed over the tensor-parallel ranks in backward (identity without
        them); under sequence parallelism the rank's `[s / tp, ...]` slice is all-gathered
        first (`[s, ...]`), and backward reduce-scatters the gradient back.
        """
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(x, self.pg.tp)  # [s, ...]
        return copy_to_tensor_model_parallel_region(x, self.pg.tp)

    def _expand(self, c_kv: Tensor, k_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values from the latent (the non-absorbed form)."""
        config = self.config
        heads = self.num_attention_heads_per_partition
        kv = _apply_linear(self.linear_kv_up_proj, c_kv)  # [s, b, np * (qk + v)]
        s, batch = kv.shape[0], kv.shape[1]  # the whole sequence, also under sequence parallelism
        kv = kv.view(s, batch, heads, config.qk_head_dim + config.v_head_dim)
        k_nope, value = torch.split(kv, [config.qk_head_dim, config.v_head_dim], dim=-1)
        k_pe = k_pe.unsqueeze(2).expand(s, batch, heads, config.qk_pos_emb_head_dim)
        key = torch.cat((k_nope, k_pe), dim=-1)  # [s, b, np, qk + rope]
        return key, value.contiguous()  # value [s, b, np, v]

    def _absorbed_attention(self, q_nope: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor,
                            attention_mask: Tensor | None) -> Tensor:
        """Attention straight over the latent cache, `kv_up` folded into query and output.

        score = q_nope . (W_uk c) + q_pe . k_pe = (W_uk^T q_nope) . c + q_pe . k_pe, so the
        latent acts as a single key/value head shared by every query head (multi-query).
        """
        config = self.config
        sq, batch, heads = q_nope.shape[0], q_nope.shape[1], q_nope.shape[2]
        w_kv = self._kv_up_weight(c_kv)  # [np * (qk + v), r]
        w_kv = w_kv.view(heads, config.qk_head_dim + config.v_head_dim, config.kv_lora_rank)
        w_uk, w_uv = torch.split(w_kv, [config.qk_head_dim, config.v_head_dim], dim=1)
        q_latent = torch.einsum("sbhd,hdr->sbhr", q_nope, w_uk)  # [sq, b, np, r]
        query = torch.cat((q_latent, q_pe), dim=-1)  # [sq, b, np, r + rope]
        key = torch.cat((c_kv, k_pe), dim=-1).unsqueeze(2)  # [sk, b, 1, r + rope]
        value = c_kv.unsqueeze(2)  # [sk, b, 1, r]
        context = self._core(query, key, value, attention_mask)  # [sq, b, np * r]
        context = context.view(sq, batch, heads, config.kv_lora_rank)  # [sq, b, np, r]
        context = torch.einsum("sbhr,hvr->sbhv", context, w_uv)  # [sq, b, np, v]
        return context.reshape(sq, batch, heads * config.v_head_dim)  # [sq, b, np * v]

    def _kv_up_weight(self, like: Tensor) -> Tensor:
        """This rank's `kv_up` matrix `[np/tp * (qk + v), r]`.

        The `weight` attribute of a standard linear layer, else (a layer that keeps its weight
        another way) the matrix recovered by applying the layer to the identity.
        """
        config = self.config
        rows = self.num_attention_heads_per_partition * (config.qk_head_dim + config.v_head_dim)
        cols = config.kv_lora_rank
        weight: object = getattr(self.linear_kv_up_proj, "weight", None)
        if isinstance(weight, Tensor) and tuple(weight.shape) == (rows, cols):
            return weight.to(like.dtype)
        eye = torch.eye(cols, dtype=like.dtype, device=like.device).unsqueeze(1)  # [r, 1, r]
        columns = _apply_linear(self.linear_kv_up_proj, eye)  # [r, 1, rows]
        return columns.squeeze(1).t()  # [rows, r]

    def _core(self, query: Tensor, key: Tensor, value: Tensor,
              attention_mask: Tensor | None) -> Tensor:
        # Causal masks are bottom-right aligned, so cached keys before the new queries stay visible.
        return apply_module(self.core_attention)(
            query, key, value, attention_mask, attn_mask_type=self.attn_mask_type)

    # ------------------------------------------------------------------ cache
    def _cached(self, context: InferenceContext, new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Write `new` (each `[sq, b, ...]`) at the context's offset; return the filled prefix."""
        sq, batch = new[0].shape[0], new[0].shape[1]
        if batch > context.max_batch_size:
            raise ValueError(f"batch size {batch} exceeds the InferenceContext's max_batch_size="
                             f"{context.max_batch_size}; create it with a larger max_batch_size")
        entry = context.key_value_memory_dict.get(self.layer_number)
        if entry is None:
            entry = tuple(
                torch.zeros((context.max_sequence_length, context.max_batch_size, *t.shape[2:]),
                            dtype=t.dtype, device=t.device)
                for t in new)  # each [max_seq, max_b, ...]
            context.key_value_memory_dict[self.layer_number] = entry
        expected = [(context.max_sequence_length, context.max_batch_size, *t.shape[2:])
                    for t in new]
        if [tuple(t.shape) for t in entry] != expected:
            raise ValueError(
                f"InferenceContext cache of layer {self.layer_number} has shapes "
                f"{[tuple(t.shape) for t in entry]}, expected {expected}: is another layer using "
                "the same layer_number, or did cache_mla_latents change? Call context.reset()")
        start, end = context.sequence_len_offset, context.sequence_len_offset + sq
        filled: list[Tensor] = []
        for cache, values in zip(entry, new, strict=True):
            cache[start:end, :batch] = values.to(cache.dtype)
            filled.append(cache[:end, :batch])  # [end, b, ...]
        return filled[0], filled[1]

    # ------------------------------------------------------------------ misc
    def _check_input(self, hidden_states: Tensor) -> None:
        expected = self.config.hidden_size
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != expected:
            raise ValueError(f"MultiLatentAttention.forward: hidden_states has shape "
                             f"{tuple(hidden_states.shape)}, expected [sequence, batch, {expected}] "
                             f"(config.hidden_size={expected})")

    def backward_dw(self) -> None:
        """Compute the deferred weight gradients of every projection (`config.delay_wgrad_compute`)."""
        for linear in (self.linear_q_proj, self.linear_q_down_proj, self.linear_q_up_proj,
                       self.linear_kv_down_proj, self.linear_kv_up_proj, self.linear_proj):
            if linear is not None:
                linear.backward_dw()


def _require_slots(config: MLATransformerConfig, sub: MLASelfAttentionSubmodules) -> None:
    """Raise `SpecError` naming each slot that `config` needs but `sub` leaves None."""
    needed: list[tuple[str, str]] = []
    if config.q_lora_rank is None:
        needed.append(("linear_q_proj", "q_lora_rank=None (queries projected directly)"))
    else:
        for slot in ("linear_q_down_proj", "q_layernorm", "linear_q_up_proj"):
            needed.append((slot, f"q_lora_rank={config.q_lora_rank}"))
    missing = [f"MLASelfAttentionSubmodules.{slot} is None but config.{why} needs it"
               for slot, why in needed if getattr(sub, slot) is None]
    if missing:
        raise SpecError("\n".join(missing) + "\nFill the slot(s) in the spec (e.g. "
                        "mla_self_attention_spec(backend, config)) or change the config")
