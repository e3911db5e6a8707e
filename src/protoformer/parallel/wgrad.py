"""Deferred weight gradients: a linear whose backward leaves the weight gradient for later.

With `config.delay_wgrad_compute` the linear layers call `linear_with_deferred_weight_grad`
instead of `F.linear`: backward computes only the input gradient and queues `(input,
grad_output)` on the layer's list; the layer's `backward_dw()` later passes that list to
`accumulate_pending_weight_grads`, which computes the weight gradient (and the bias gradient
when the bias is applied inside the matmul) and accumulates it into `.grad` exactly as
autograd would. Hooks on gradient accumulation (`register_post_accumulate_grad_hook`) do not
fire for deferred gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import FunctionCtx

from protoformer.parallel.mappings import apply_autograd_function

__all__ = [
    "PendingWeightGrad",
    "accumulate_pending_weight_grads",
    "linear_with_deferred_weight_grad",
]


@dataclass
class PendingWeightGrad:
    """One backward pass's inputs to the weight gradient, kept until `backward_dw()`."""

    input: Tensor  # [n, in]
    grad_output: Tensor  # [n, out]
    weight: Tensor | None  # None when its gradient was computed in backward
    bias: Tensor | None  # None when there is no bias or its gradient was computed in backward


class _LinearContext(FunctionCtx):
    """What `_LinearWithDeferredWeightGrad` keeps for backward (a static view of torch's context)."""

    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    bias: Tensor | None
    pending: list[PendingWeightGrad]


class _LinearWithDeferredWeightGrad(Function):
    """`F.linear` whose backward returns only the input gradient and queues the weight's."""

    @staticmethod
    def forward(ctx: _LinearContext, input_: Tensor, weight: Tensor, bias: Tensor | None,
                pending: list[PendingWeightGrad]) -> Tensor:
        ctx.save_for_backward(input_, weight)
        ctx.bias = bias
        ctx.pending = pending
        return F.linear(input_, weight, bias)  # [..., out]

    @staticmethod
    def backward(ctx: _LinearContext, *grad_outputs: Tensor
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        (grad_output,) = grad_outputs  # [..., out]
        input_, weight = ctx.saved_tensors
        bias = ctx.bias
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = None
        if needs_input:
            grad_input = grad_output.matmul(weight.to(grad_output.dtype)).to(input_.dtype)  # [..., in]
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])  # [n, out]
        input_2d = input_.reshape(-1, input_.shape[-1]).to(grad_2d.dtype)  # [n, in]
        # Only leaves can be given a gradient later; a computed weight (a cast, a tied view)
        # gets its gradient now, through autograd.
        defer_weight = needs_weight and weight.is_leaf
        defer_bias = needs_bias and bias is not None and bias.is_leaf
        grad_weight = grad_bias = None
        if needs_weight and not defer_weight:
            grad_weight = grad_2d.t().mm(input_2d).to(weight.dtype)  # [out, in]
        if needs_bias and not defer_bias and bias is not None:
            grad_bias = grad_2d.sum(0).to(bias.dtype)  # [out]
        if defer_weight or defer_bias:
            ctx.pending.append(PendingWeightGrad(
                input=input_2d, grad_output=grad_2d,
                weight=weight if defer_weight else None,
                bias=bias if defer_bias else None))
        return grad_input, grad_weight, grad_bias, None


def linear_with_deferred_weight_grad(input_: Tensor, weight: Tensor, bias: Tensor | None,
                                     pending: list[PendingWeightGrad]) -> Tensor:
    """`F.linear(input_, weight, bias)` whose backward queues the parameter gradients on `pending`."""
    return apply_autograd_function(_LinearWithDeferredWeightGrad, input_, weight, bias, pending)


def _accumulate_grad(parameter: Tensor, grad: Tensor) -> None:
    """Add `grad` to `parameter.grad` as autograd's accumulation does (set, else add in place)."""
    existing = parameter.grad
    if existing is None:
        parameter.grad = grad
    else:
        existing.add_(grad)


def accumulate_pending_weight_grads(pending: list[PendingWeightGrad]) -> None:
    """Compute the gradients queued on `pending` into `.grad`, in backward order; empty it.

    The list is emptied in place, since the queued autograd nodes of a later backward hold it.
    """
    entries = list(pending)
    pending.clear()
    with torch.no_grad():
        for entry in entries:
            if entry.weight is not None:
                grad_weight = entry.grad_output.t().mm(entry.input)  # [out, in]
                _accumulate_grad(entry.weight, grad_weight.to(entry.weight.dtype))
            if entry.bias is not None:
                grad_bias = entry.grad_output.sum(0)  # [out]
                _accumulate_grad(entry.bias, grad_bias.to(entry.bias.dtype))
