"""Cross-entropy over logits whose vocabulary is split across tensor-parallel ranks.

The full `[s, b, v]` logits are never gathered: each rank reduces its `[s, b, v / tp]` slice to
per-token numbers and only those cross the group: the maximum logit (all-reduce max), then the
target's logit, the sum of exponentials and, with label smoothing, the sum of logits (one
all-reduce sum of a `[3, s, b]` stack). Backward needs no communication: the gradient of this
rank's slice is `softmax - target distribution` restricted to the slice.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from protoformer.parallel.groups import ProcessGroup, group_rank, group_size
from protoformer.parallel.mappings import all_reduce_in_place, apply_autograd_function

__all__ = ["vocab_parallel_cross_entropy"]


class _CrossEntropyContext(FunctionCtx):
    """What `_VocabParallelCrossEntropy` keeps for backward (a static view of torch's context)."""

    saved_tensors: tuple[Tensor, ...]
    label_smoothing: float
    vocab_size: int
    logits_dtype: torch.dtype


class _VocabParallelCrossEntropy(Function):
    @staticmethod
    def forward(ctx: _CrossEntropyContext, vocab_parallel_logits: Tensor, target: Tensor,
                group: ProcessGroup | None, label_smoothing: float) -> Tensor:
        partition_vocab = vocab_parallel_logits.shape[-1]
        vocab_size = partition_vocab * group_size(group)
        vocab_start = group_rank(group) * partition_vocab

        # Shift by the global maximum so exp() cannot overflow; computed in float32.
        logits = vocab_parallel_logits.float()  # [s, b, v / tp]
        logits_max = all_reduce_in_place(logits.amax(dim=-1), group, op="max")  # [s, b]
        shifted = logits - logits_max.unsqueeze(-1)  # [s, b, v / tp], a new tensor

        # The target's logit lives on one rank; the others contribute zero to the sum.
        outside = (target < vocab_start) | (target >= vocab_start + partition_vocab)  # [s, b]
        local_target = (target - vocab_start).masked_fill(outside, 0)  # [s, b]
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # [s, b]
        predicted = predicted.masked_fill(outside, 0.0)
        sum_logits = shifted.sum(dim=-1) if label_smoothing > 0.0 else torch.zeros_like(predicted)

        exp_logits = shifted.exp_()  # [s, b, v / tp], in place: `shifted` is ours
        stats = torch.stack([predicted, exp_logits.sum(dim=-1), sum_logits])  # [3, s, b]
        predicted, sum_exp, sum_logits = all_reduce_in_place(stats, group, op="sum").unbind(0)

        log_sum_exp = torch.log(sum_exp)  # [s, b]
        loss = log_sum_exp - predicted  # [s, b]
        if label_smoothing > 0.0:
            # torch's definition: the target distribution is (1 - eps) * one_hot + eps / v.
            smooth_loss = log_sum_exp - sum_logits / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth_loss

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))  # [s, b, v / tp]
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.label_smoothing = label_smoothing
        ctx.vocab_size = vocab_size
        ctx.logits_dtype = vocab_parallel_logits.dtype
        return loss

    @staticmethod
    def backward(ctx: _CrossEntropyContext, *grad_outputs: Tensor
                 ) -> tuple[Tensor, None, None, None]:
        (grad_output,) = grad_outputs  # [s, b]
        softmax, local_target, outside = ctx.saved_tensors
        smoothing = ctx.label_smoothing
        # d loss / d logits = softmax - target distribution (restricted to this rank's slice).
        if smoothing > 0.0:
            grad = softmax - smoothing / ctx.vocab_size  # [s, b, v / tp]
        else:
            grad = softmax.clone()  # softmax stays intact for a second backward
        target_weight = (1.0 - smoothing) * (~outside).to(grad.dtype)  # [s, b]
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -target_weight.unsqueeze(-1))
        grad.mul_(grad_output.unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor,
                                 tp_group: ProcessGroup | None, *,
                                 label_smoothing: float = 0.0) -> Tensor:
    """Per-token cross-entropy `[s, b]` of vocabulary-split logits `[s, b, v / tp]`.

    `target` `[s, b]` holds global token ids in `[0, v)`; rank `r`'s logits cover ids
    `[r * v / tp, (r + 1) * v / tp)`. Equals `torch.nn.functional.cross_entropy(logits,
    target, reduction="none", label_smoothing=...)` on the gathered logits; the loss is float32
    (computed in float32 whatever the logits' dtype) and the gradient has the logits' dtype.
    There is no `ignore_index`: mask padded tokens out of the loss afterwards.

    Target ids outside `[0, v)` raise `ValueError` when `target` is on the CPU; on an
    accelerator the check is skipped (it would stall the device).
    """
    if vocab_parallel_logits.dim() < 1 or tuple(target.shape) != tuple(vocab_parallel_logits.shape[:-1]):
        raise ValueError(
            f"vocab_parallel_cross_entropy: target shape {tuple(target.shape)} must equal the "
            f"logits shape {tuple(vocab_parallel_logits.shape)} without its last (vocabulary) dim")
    if not vocab_parallel_logits.is_floating_point():
        raise TypeError(f"vocab_parallel_cross_entropy: logits must be floating point, got "
                        f"{vocab_parallel_logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vocab_parallel_cross_entropy: target must hold int64 or int32 token "
                        f"ids, got {target.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing={label_smoothing} must "
                         "lie in [0, 1]")
    vocab_size = vocab_parallel_logits.shape[-1] * group_size(tp_group)
    if target.device.type == "cpu" and target.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(target))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"vocab_parallel_cross_entropy: target ids must lie in [0, {vocab_size}) (the "
                f"vocabulary over all ranks), got ids from {low} to {high}; replace padding "
                "ids with a valid id and mask those tokens out of the loss")
    return apply_autograd_function(_VocabParallelCrossEntropy, vocab_parallel_logits, target,
                                   tp_group, float(label_smoothing))
