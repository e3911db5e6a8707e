"""Triton kernel: per-row cross-entropy of a logits chunk and its gradient, written in place.

Imported only by `protoformer.kernels.linear_cross_entropy` once `triton_available()` is True.
"""
# Triton kernels are written in Triton's untyped DSL (`tl.*` values, `tl.constexpr`
# parameters) and Triton may be absent where the type checkers run, so this one file is
# exempt from them; the typed entry point is `protoformer.kernels.linear_cross_entropy`.
# mypy: ignore-errors
# pyright: basic, reportMissingImports=false, reportMissingModuleSource=false, reportIndexIssue=false

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_grad_kernel(
    logits_ptr, target_ptr, loss_ptr,
    stride_row, vocab, scale,
    BLOCK: tl.constexpr,
):
    # One program per token row: an online log-sum-exp over the vocabulary in float32
    # (first pass), then the row's loss and `scale * (softmax - one_hot)` over the logits
    # themselves (second pass), so the chunk's logits are read twice and written once.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row).to(tl.int64)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) \
            + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - picked)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_range = cols < vocab
        x = tl.load(base + cols, mask=in_range, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse)
        grad = tl.where(cols == target, grad - 1.0, grad) * scale
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_range)


def cross_entropy_grad_(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
                        scale: float) -> None:
    """`logits [c, v]` (row-contiguous) -> `loss [c]` (float32) and, in place,
    `logits = scale * (softmax(logits) - one_hot(target))`."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = min(32768, triton.next_power_of_2(vocab))
    warps = 32 if block >= 16384 else (16 if block >= 4096 else 4)
    _cross_entropy_grad_kernel[(rows,)](
        logits, target, loss, logits.stride(0), vocab, scale, BLOCK=block, num_warps=warps)
