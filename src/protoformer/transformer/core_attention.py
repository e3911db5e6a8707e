"""Core attention: softmax(q k^T * scale + mask + bias) v over already-projected heads.

Two implementations of `CoreAttentionBuilder`, interchangeable in any spec:

- `DotProductAttention`: the plain-math reference (explicit scores and softmax), easy to
  read and to step through; it materializes the `[b, np, sq, sk]` score matrix.
- `SDPAttention`: the same computation through `torch.nn.functional.scaled_dot_product_attention`,
  which picks a fused kernel (flash / memory-efficient) where one applies.

Shared semantics
- query `[sq, b, np, hn]`, key `[sk, b, ng, hn]`, value `[sk, b, ng, hv]` -> `[sq, b, np * hv]`.
  `ng` divides `np`; query heads `g * np/ng ... (g + 1) * np/ng - 1` share key/value group `g`
  (grouped-query attention; `ng == 1` is multi-query). `hv` may differ from `hn` (MLA).
- Masks: a boolean `attention_mask` is True where attention is blocked; a floating one is added
  to the scores. The mask type (per call, else the constructor's) decides what is applied:
  `causal` -> a bottom-right aligned causal mask (`masks.causal_mask`), combined with
  `attention_mask` when one is given (Transformer Engine drops it; silently ignoring a padding
  mask the caller passed would attend to padding), `padding` / `arbitrary` -> `attention_mask`
  as given, `padding_causal` -> both, `no_mask` -> nothing. With `window_size=W` the causal
  types also block keys `W` or more positions before the query (`masks.sliding_window_mask`,
  sliding-window attention); the window mask is materialized, so SDPA runs its masked
  kernels (flash attention takes no arbitrary mask).
- `attention_bias` (floating, broadcastable to `[b, np, sq, sk]`) is added to the scaled scores.
- Soft-capping (`config.attn_logit_softcapping = c`, Gemma 2): the scaled scores become
  `c * tanh(scores / c)` before masks and bias apply. SDPA cannot soft-cap, so `SDPAttention`
  computes such layers explicitly (as `DotProductAttention`, materializing the scores) — except
  on CUDA, where plain causal soft-capped or sliding layers run FlexAttention (`flex_attention`).
- Scale: the `softmax_scale` argument, else `config.softmax_scale`, else `1 / sqrt(hn)`.
- Dropout on the probabilities with `attention_dropout` (else `config.attention_dropout`), only
  in training mode.
- A query row whose every key is blocked (all True, or all `-inf`) yields a **zero** context
  vector, with zero (not NaN) gradients, in both implementations.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.random import tensor_parallel_rng_fork
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.flex_attention import flex_attention_available, flex_causal_attention
from protoformer.transformer.interfaces import AttentionTypeName
from protoformer.transformer.masks import (
    causal_mask,
    check_mask,
    check_window_size,
    combine_masks,
    fully_blocked_rows,
    sliding_window_mask,
)

__all__ = ["DotProductAttention", "SDPAttention"]


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


# `enable_gqa` (key/value heads shared without copying) arrived in torch 2.5.
_SDPA_HAS_GQA = _torch_at_least(2, 5)


class _CoreAttentionBase(nn.Module):
    """Constructor, input checks and mask resolution shared by both implementations."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: AttentionTypeName = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        pg: ProcessGroups | None = None,
        window_size: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(attn_mask_type, AttnMaskType):  # pyright: ignore[reportUnnecessaryIsInstance]  # user input, checked at runtime
            raise TypeError(f"{name}(attn_mask_type={attn_mask_type!r}): expected an AttnMaskType "
                            "member such as AttnMaskType.causal")
        if attention_type not in ("self", "cross"):
            raise ValueError(f"{name}(attention_type={attention_type!r}): expected 'self' or 'cross'")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{name}(attention_dropout={attention_dropout!r}): the dropout "
                             "probability must be in [0, 1]")
        scale = config.softmax_scale if softmax_scale is None else softmax_scale
        if scale is not None and not scale > 0.0:
            raise ValueError(f"{name}(softmax_scale={softmax_scale!r}): must be > 0, or None for "
                             "1 / sqrt(head size)")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type: AttentionTypeName = attention_type
        self.attention_dropout = dropout
        self.softmax_scale = scale
        self.pg = pg if pg is not None else ProcessGroups()
        self.window_size = check_window_size(window_size, owner=name)
        self.attn_logit_softcapping = config.attn_logit_softcapping

    def extra_repr(self) -> str:
        window = "" if self.window_size is None else f", window_size={self.window_size}"
        if self.attn_logit_softcapping is not None:
            window += f", attn_logit_softcapping={self.attn_logit_softcapping}"
        return (f"layer_number={self.layer_number}, attn_mask_type={self.attn_mask_type.name}, "
                f"attention_dropout={self.attention_dropout}, softmax_scale={self.softmax_scale}"
                f"{window}")

    def _scale_for(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def _math_attention(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                        is_plain_causal: bool) -> Tensor:
        """Explicit scores, (soft-capped,) masked softmax, weighted values: `[sq, b, np, hn]`,
        `[sk, b, ng, hn]`, `[sk, b, ng, hv]` and the resolved mask -> `[sq, b, np * hv]`."""
        sq, batch, heads, hn = query.shape
        sk, groups, hv = key.shape[0], key.shape[2], value.shape[3]
        if is_plain_causal:
            mask = causal_mask(sq, sk, query.device)

        # Heads of one group are contiguous, so grouping is a view, never a copy of key/value.
        per_group = heads // groups
        grouped_query = query.view(sq, batch, groups, per_group, hn)  # [sq, b, ng, r, hn]
        scores = torch.einsum("qbgrd,kbgd->bgrqk", grouped_query, key)  # [b, ng, r, sq, sk]
        scores = scores.reshape(batch, heads, sq, sk)  # [b, np, sq, sk]
        if self.config.attention_softmax_in_fp32:
            scores = scores.float()
        scores = scores * self._scale_for(hn)
        cap = self.attn_logit_softcapping
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap  # in (-cap, cap), before the mask

        blocked_rows: Tensor | None = None
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
            # Softmax of an all -inf row is 0/0; give it finite scores, then zero its output.
            blocked_rows = fully_blocked_rows(mask)  # [b | 1, np | 1, sq, 1]
            scores = scores.masked_fill(blocked_rows, 0.0)
        probs = torch.softmax(scores, dim=-1)  # [b, np, sq, sk]
        if blocked_rows is not None:
            probs = probs.masked_fill(blocked_rows, 0.0)
        probs = probs.to(value.dtype)
        if self.training and self.attention_dropout > 0.0:
            # This rank's heads: a mask of its own (the per-rank stream under tensor parallelism).
            with tensor_parallel_rng_fork(self.pg.tp):
                probs = F.dropout(probs, p=self.attention_dropout, training=True)

        grouped_probs = probs.view(batch, groups, per_group, sq, sk)  # [b, ng, r, sq, sk]
        context = torch.einsum("bgrqk,kbgd->qbgrd", grouped_probs, value)  # [sq, b, ng, r, hv]
        return context.reshape(sq, batch, heads * hv)  # [sq, b, np * hv]

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[int, int, int, int]:
        """Validate the shapes; return `(b, np, sq, sk)`."""
        name = type(self).__name__
        for label, tensor in (("query", query), ("key", key), ("value", value)):
            if tensor.dim() != 4:
                raise ValueError(f"{name}: {label} must be 4-D [s, b, heads, head_dim], got "
                                 f"shape {tuple(tensor.shape)}")
        sq, batch, heads, hn = query.shape
        sk, key_batch, groups, key_hn = key.shape
        shapes = (f"query {tuple(query.shape)}, key {tuple(key.shape)}, "
                  f"value {tuple(value.shape)}")
        if value.shape[:3] != key.shape[:3]:
            raise ValueError(f"{name}: key and value must agree on [sk, b, ng]; got {shapes}")
        if key_batch != batch:
            raise ValueError(f"{name}: query has batch {batch} but key/value have batch "
                             f"{key_batch}; got {shapes}")
        if key_hn != hn:
            raise ValueError(f"{name}: query and key head sizes differ ({hn} vs {key_hn}); "
                             f"got {shapes}")
        if heads % groups != 0:
            raise ValueError(f"{name}: {heads} query heads cannot be shared evenly by {groups} "
                             f"key/value groups (np must be divisible by ng); got {shapes}")
        if not (query.dtype == key.dtype == value.dtype):
            raise ValueError(f"{name}: query, key and value must share one dtype, got "
                             f"{query.dtype}, {key.dtype}, {value.dtype}")
        return batch, heads, sq, sk

    def _effective_mask(
        self,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None,
        attention_bias: Tensor | None,
        shape: tuple[int, int, int, int],
        device: torch.device,
    ) -> tuple[Tensor | None, bool]:
        """`(mask, is_plain_causal)`: the mask to apply (boolean blocked or additive, bias
        included; None when nothing is masked), and whether it is exactly a square causal mask
        (so a fused kernel may generate it itself)."""
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        _, _, sq, sk = shape
        is_causal_type = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        # One query attends every cached key under the bottom-right causal rule.
        causal = is_causal_type and sq > 1
        # The window blocks something only when the last query has more than `window` keys.
        window = self.window_size if is_causal_type and self.window_size is not None \
            and sk > self.window_size else None
        uses_given = mask_type is not AttnMaskType.no_mask
        given = attention_mask if uses_given else None
        if given is not None:
            check_mask(given, shape, what="attention_mask")
        if attention_bias is not None:
            if not attention_bias.dtype.is_floating_point:
                raise TypeError(f"attention_bias has dtype {attention_bias.dtype}; it is added to "
                                "the scores, so it must be floating (pass a boolean mask as "
                                "attention_mask instead)")
            check_mask(attention_bias, shape, what="attention_bias")
        if causal and window is None and given is None and attention_bias is None and sq == sk:
            return None, True
        causal_part = causal_mask(sq, sk, device) if causal else None
        window_part = sliding_window_mask(sq, sk, window, device) if window is not None else None
        return combine_masks(given, causal_part, window_part, attention_bias), False


class DotProductAttention(_CoreAttentionBase):
    """Core attention in plain tensor math: explicit scores, masked softmax, weighted values.

    The scores are computed in the input dtype and, with `config.attention_softmax_in_fp32`,
    masked and normalized in float32 (the probabilities return to the value dtype). See the
    module docstring for masks, scale, dropout and fully blocked rows.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        /,
        *,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
    ) -> Tensor:
        """`[sq, b, np, hn]`, `[sk, b, ng, hn]`, `[sk, b, ng, hv]` -> `[sq, b, np * hv]`."""
        batch, heads, sq, sk = self._check_inputs(query, key, value)
        mask, is_plain_causal = self._effective_mask(
            attention_mask, attn_mask_type, attention_bias, (batch, heads, sq, sk), query.device)
        return self._math_attention(query, key, value, mask, is_plain_causal)


class SDPAttention(_CoreAttentionBase):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`.

    A square causal mask with nothing else is passed as `is_causal=True` (letting a fused
    kernel skip the masked blocks); any other mask is materialized and passed explicitly.
    Grouped key/value heads use `enable_gqa` when no explicit mask is needed (torch >= 2.5),
    otherwise they are repeated to one per query head. The kernel chooses its own softmax
    precision (float32 accumulation), so `config.attention_softmax_in_fp32` does not apply.
    On CUDA, soft-capped or sliding plain causal calls run FlexAttention (`flex_attention`);
    if it cannot compile, that is warned once and the other paths take over.
    """

    flex_failed = False  # set once FlexAttention has failed in this process

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        /,
        *,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
    ) -> Tensor:
        """`[sq, b, np, hn]`, `[sk, b, ng, hn]`, `[sk, b, ng, hv]` -> `[sq, b, np * hv]`."""
        batch, heads, sq, sk = self._check_inputs(query, key, value)
        groups, hv = key.shape[2], value.shape[3]
        if self._flex_applies(query, key, value, attention_mask, attn_mask_type, attention_bias):
            window = self.window_size if self.window_size is not None \
                and sk > self.window_size else None
            try:
                return flex_causal_attention(
                    query, key, value, scale=self._scale_for(query.shape[3]),
                    softcap=self.attn_logit_softcapping, window=window)
            except Exception as error:  # no working compiler toolchain: keep going, unfused
                SDPAttention.flex_failed = True
                warnings.warn(f"SDPAttention: FlexAttention failed to compile or run ({error!r}); "
                              "soft-capped and sliding layers use SDPA / explicit attention",
                              stacklevel=2)
        mask, is_plain_causal = self._effective_mask(
            attention_mask, attn_mask_type, attention_bias, (batch, heads, sq, sk), query.device)
        if self.attn_logit_softcapping is not None:
            # No SDPA kernel soft-caps the scores: the explicit computation does.
            return self._math_attention(query, key, value, mask, is_plain_causal)

        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)  # [b, ng, sk, hv]

        attn_mask: Tensor | None = None
        blocked_rows: Tensor | None = None
        if mask is not None:
            # Unblock fully blocked rows for the kernel (0/0 otherwise) and zero them after.
            blocked_rows = fully_blocked_rows(mask)  # [b | 1, np | 1, sq, 1]
            if mask.dtype == torch.bool:
                # SDPA's boolean masks mark *allowed* keys: not blocked, or in a fully blocked
                # row; `mask <= blocked_rows` is that in one kernel (False <= x, True <= True).
                attn_mask = mask <= blocked_rows
            else:
                attn_mask = mask.masked_fill(blocked_rows, 0.0).to(q.dtype)

        dropout_p = self.attention_dropout if self.training else 0.0
        scale = self._scale_for(query.shape[3])
        # Dropout inside the kernel masks this rank's heads: draw from the per-rank stream.
        rng = (tensor_parallel_rng_fork(self.pg.tp) if dropout_p > 0.0
               else contextlib.nullcontext())
        with rng:
            if sq == 1 and groups != heads and (attn_mask is not None or not _SDPA_HAS_GQA):
                # One query per head (decoding): the r = np/ng query heads of a group become r
                # query rows against the group's keys, so the fused kernels take a mask
                # without a copy of the keys/values per head (`enable_gqa` takes no mask).
                per_group = heads // groups
                folded = F.scaled_dot_product_attention(
                    q.reshape(batch, groups, per_group, q.shape[3]), k, v,
                    attn_mask=None if attn_mask is None
                    else _fold_query_heads(attn_mask, groups, per_group),
                    dropout_p=dropout_p, scale=scale)  # [b, ng, r, hv]
                out = folded.reshape(batch, heads, 1, hv)  # [b, np, 1, hv]
            elif groups != heads and _SDPA_HAS_GQA and attn_mask is None:
                out = F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, is_causal=is_plain_causal, scale=scale,
                    enable_gqa=True)  # [b, np, sq, hv]
            else:
                if groups != heads:
                    k = k.repeat_interleave(heads // groups, dim=1)  # [b, np, sk, hn]
                    v = v.repeat_interleave(heads // groups, dim=1)  # [b, np, sk, hv]
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_plain_causal,
                    scale=scale)  # [b, np, sq, hv]
        if blocked_rows is not None:
            out = out.masked_fill(blocked_rows, 0.0)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * hv)  # [sq, b, np * hv]


    def _flex_applies(self, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, attn_mask_type: AttnMaskType | None,
                      attention_bias: Tensor | None) -> bool:
        """Whether this call takes FlexAttention: a soft-capping or sliding layer, plain causal
        self-attention over `sq <= sk` keys (no padding mask, bias or dropout), on CUDA."""
        if (self.attn_logit_softcapping is None and self.window_size is None) \
                or SDPAttention.flex_failed:
            return False
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        return (mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
                and attention_mask is None and attention_bias is None
                and 1 < query.shape[0] <= key.shape[0]
                and not (self.training and self.attention_dropout > 0.0)
                and flex_attention_available(query, key, value))


def _fold_query_heads(mask: Tensor, groups: int, per_group: int) -> Tensor:
    """A one-query mask `[b | 1, np | 1, 1, sk]` for query heads folded into rows:
    `[b | 1, ng | 1, r | 1, sk]` (the heads of group g are rows of g)."""
    if mask.dim() < 4 or mask.shape[1] == 1:
        return mask  # [b | 1, 1, 1, sk] (or fewer dims) broadcasts over groups and rows
    return mask.reshape(mask.shape[0], groups, per_group, mask.shape[3])
