"""Triton kernel of rotary position embedding (non-interleaved layout), forward and backward.

Imported only by `protoformer.kernels.rope` once `triton_available()` is True.
"""
# Triton kernels are written in Triton's untyped DSL (`tl.*` values, `tl.constexpr`
# parameters) and Triton may be absent where the type checkers run, so this one file is
# exempt from them; the typed entry point is `protoformer.kernels.rope`.
# mypy: ignore-errors
# pyright: basic, reportMissingImports=false, reportMissingModuleSource=false, reportIndexIssue=false

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    batch, heads,
    stride_xs, stride_xb, stride_xh,
    stride_os, stride_ob, stride_oh,
    stride_cs,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per (position, batch) row: every head of that token, all channels.
    row = tl.program_id(0)
    pos = (row // batch).to(tl.int64)
    b = (row % batch).to(tl.int64)
    head = tl.arange(0, BLOCK_HEADS)[:, None]
    col = tl.arange(0, BLOCK_HALF)[None, :]
    head_ok = head < heads
    both_ok = head_ok & (col < HALF)

    cos = tl.load(cos_ptr + pos * stride_cs + col, mask=col < HALF, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_cs + col, mask=col < HALF, other=0.0)
    if BACKWARD:
        sin = -sin  # the adjoint of a rotation is the rotation by the opposite angle

    x_row = x_ptr + pos * stride_xs + b * stride_xb + head * stride_xh
    out_row = out_ptr + pos * stride_os + b * stride_ob + head * stride_oh
    first = tl.load(x_row + col, mask=both_ok, other=0.0).to(tl.float32)
    second = tl.load(x_row + HALF + col, mask=both_ok, other=0.0).to(tl.float32)
    out_first = first * cos - second * sin
    out_second = second * cos + first * sin
    tl.store(out_row + col, out_first.to(out_ptr.dtype.element_ty), mask=both_ok)
    tl.store(out_row + HALF + col, out_second.to(out_ptr.dtype.element_ty), mask=both_ok)

    if ROT < HEAD_DIM:  # partial rotary: the remaining channels pass through
        rest = tl.arange(0, BLOCK_PASS)[None, :]
        rest_ok = head_ok & (rest < HEAD_DIM - ROT)
        kept = tl.load(x_row + ROT + rest, mask=rest_ok, other=0.0)
        tl.store(out_row + ROT + rest, kept, mask=rest_ok)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backward: bool) -> torch.Tensor:
    """Rotate `x` `[s, b, n, d]` (last dim contiguous) by `cos`/`sin` `[s, rot / 2]` (float32)."""
    seq, batch, heads, head_dim = x.shape
    half = cos.shape[1]
    out = torch.empty((seq, batch, heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rest = head_dim - 2 * half
    block_heads = triton.next_power_of_2(heads)
    block_half = triton.next_power_of_2(half)
    # Keep one program's tile within a few thousand elements (registers).
    num_warps = 4 if block_heads * block_half <= 4096 else 8
    _rope_kernel[(seq * batch,)](
        x, cos, sin, out,
        batch, heads,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0),
        HALF=half, ROT=2 * half, HEAD_DIM=head_dim,
        BLOCK_HEADS=block_heads, BLOCK_HALF=block_half,
        BLOCK_PASS=triton.next_power_of_2(max(rest, 1)),
        BACKWARD=backward,
        num_warps=num_warps,
    )
    return out
