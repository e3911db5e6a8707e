"""FlexAttention for the layers SDPA cannot run fused: soft-capped scores and sliding windows.

`torch.nn.attention.flex_attention` compiles one Triton kernel from a `score_mod` (here the
Gemma 2 soft-cap `c * tanh(s / c)`) and a block-sparse mask (causal, optionally within a
window of W keys), so such layers neither materialize the `[b, np, sq, sk]` scores (the math
path) nor a dense banded mask (SDPA's masked kernels), and blocks wholly outside the window
are skipped. `SDPAttention` takes this path on CUDA when a layer soft-caps or slides and the
call is plain causal self-attention over a full sequence (no padding mask, no bias, no
dropout); anything else keeps the SDPA / math paths, which remain the CPU reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["flex_attention_available", "flex_causal_attention"]

_FLEX_HEAD_SIZES = (16, 32, 64, 128, 256)


@functools.cache
def _flex() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """`(compiled flex_attention, create_block_mask)`, or None where torch lacks them."""
    try:
        from torch.nn.attention import flex_attention as module
    except ImportError:  # pragma: no cover - torch < 2.5
        return None
    compiled: Callable[..., Any] = torch.compile(module.flex_attention, dynamic=False)  # pyright: ignore[reportUnknownMemberType]  # torch.compile's overloads carry Unknown
    return compiled, module.create_block_mask


def flex_attention_available(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether the fused FlexAttention path applies to these `[s, b, heads, hn]` inputs:
    CUDA, half or float32 inputs, equal power-of-two head sizes FlexAttention's kernel takes."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and query.shape[3] == key.shape[3] == value.shape[3]
            and query.shape[3] in _FLEX_HEAD_SIZES and _flex() is not None)


@functools.lru_cache(maxsize=32)
def _block_mask(sq: int, sk: int, window: int | None, device: torch.device) -> Any:
    """The causal (bottom-right aligned), optionally windowed, block mask; cached per shape."""
    flex = _flex()
    assert flex is not None
    offset = sk - sq  # query i sits at key position i + offset

    def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx + offset >= kv_idx

    def windowed(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx + offset - kv_idx
        return (distance >= 0) & (distance < window)  # type: ignore[operator]

    return flex[1](causal if window is None else windowed, B=None, H=None, Q_LEN=sq,
                   KV_LEN=sk, device=device)


@functools.cache
def _soft_cap(cap: float) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The score modification `c * tanh(s / c)`, one function per cap (so the compiled
    kernel is reused rather than re-traced for a new closure each call)."""

    def soft_cap(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.tanh(score / cap) * cap

    return soft_cap


def flex_causal_attention(query: Tensor, key: Tensor, value: Tensor, *, scale: float,
                          softcap: float | None, window: int | None) -> Tensor:
    """Causal self-attention with optional soft-cap and window: `[sq, b, np, hn]`,
    `[sk, b, ng, hn]`, `[sk, b, ng, hn]` -> `[sq, b, np * hn]` (grouped heads shared)."""
    flex = _flex()
    assert flex is not None
    sq, batch, heads, hn = query.shape
    sk, groups = key.shape[0], key.shape[2]
    q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
    k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
    v = value.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
    out: Tensor = flex[0](q, k, v, score_mod=None if softcap is None else _soft_cap(float(softcap)), block_mask=_block_mask(sq, sk, window, q.device),
                  scale=scale, enable_gqa=groups != heads)  # [b, np, sq, hn]
    return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * hn)
