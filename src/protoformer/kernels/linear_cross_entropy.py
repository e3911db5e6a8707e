"""Output projection and cross-entropy in one step that never holds the full logits.

`fused_linear_cross_entropy(hidden, weight, target)` equals
`F.cross_entropy(hidden @ weight.T, target, reduction="none")` (float32 per-token losses),
but materializes the `[tokens, vocab]` logits only one chunk of tokens at a time: peak
memory is O(chunk * vocab) instead of O(tokens * vocab), which at a 128k vocabulary is the
difference between a few hundred megabytes and tens of gigabytes.

The loss is per token (the model's contract: the caller masks and averages), so the
gradient's per-token weights are known only in backward. Both implementations therefore keep
just the inputs and the per-token log-sum-exp from the forward pass and recompute each
chunk's logits in backward, folding the incoming per-token gradient in before the chunk's
weight gradient is summed: one extra output-layer matmul in exchange for the memory.

- On CUDA with liger-kernel: liger's `LigerFusedLinearCrossEntropyFunction` (Triton softmax
  and gradient kernels on each chunk), with `reduction="none"`.
- Elsewhere: `_ChunkedLinearCrossEntropy`, the same algorithm in plain PyTorch.

The mean loss (`reduction="mean"`, what a training step asks for) needs no recomputation:
its per-token gradient weight is `1 / N` (N = the number of tokens, a shape, known on the
host), so `_MeanLinearCrossEntropy` computes both gradients in the forward pass, chunk by
chunk, and backward only scales them by the incoming gradient. Nothing in it reads a
device value on the host (no `.item()`, no data-dependent shapes), so a training step that
uses it never waits for the GPU. Each chunk's softmax and gradient are one Triton kernel
over the logits in place (`_cross_entropy_triton`) when Triton is present, plain PyTorch
otherwise.
"""

from __future__ import annotations

from typing import Literal, Protocol, cast

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from protoformer.kernels.probe import import_optional, liger_available, triton_available
from protoformer.parallel.mappings import apply_autograd_function

__all__ = ["default_chunk_size", "fused_linear_cross_entropy"]

# Elements of one chunk's float32 logits: 16M (64 MB) on CPU, 256M (1 GB) on a GPU.
_CPU_CHUNK_ELEMENTS = 1 << 24
_GPU_CHUNK_ELEMENTS = 1 << 28


def default_chunk_size(num_tokens: int, vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk so that one chunk's float32 logits stay within the device's budget."""
    budget = _GPU_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS
    return max(1, min(num_tokens, budget // max(vocab_size, 1)))


def _mean_chunk_size(num_tokens: int, vocab_size: int, device: torch.device) -> int:
    """`default_chunk_size`, rounded down to a multiple of 64 tokens when there is more than
    one chunk (GEMM-friendly), and split evenly so the last chunk is not a sliver."""
    size = default_chunk_size(num_tokens, vocab_size, device)
    if size >= num_tokens:
        return num_tokens
    chunks = -(-num_tokens // size)
    even = -(-num_tokens // chunks)  # <= size
    return max(64, even // 64 * 64) if even >= 64 else even


class _ChunkContext(FunctionCtx):
    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    chunk_size: int


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token `cross_entropy(x @ w.T, t)` over chunks of tokens, recomputed in backward."""

    @staticmethod
    def forward(ctx: _ChunkContext, hidden: Tensor, weight: Tensor, target: Tensor,
                chunk_size: int) -> Tensor:
        num_tokens = hidden.shape[0]
        loss = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # [N]
        log_sum_exp = torch.empty_like(loss)  # [N]
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = (hidden[start:end] @ weight.t()).float()  # [c, v]
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            picked = logits.gather(1, target[start:end, None]).squeeze(1)  # [c]
            loss[start:end] = lse - picked
            log_sum_exp[start:end] = lse
        ctx.save_for_backward(hidden, weight, target, log_sum_exp)
        ctx.chunk_size = chunk_size
        return loss

    @staticmethod
    def backward(ctx: _ChunkContext, *grad_outputs: Tensor
                 ) -> tuple[Tensor | None, Tensor | None, None, None]:
        (grad_loss,) = grad_outputs  # [N]
        hidden, weight, target, log_sum_exp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, h]
        # Summed over chunks in float32, cast once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight else None  # [v, h]
        num_tokens, chunk_size = hidden.shape[0], ctx.chunk_size
        rows = torch.arange(chunk_size, device=hidden.device)  # [c]
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk = hidden[start:end]  # [c, h]
            logits = (chunk @ weight.t()).float()  # [c, v]
            # d loss / d logits = softmax - one_hot(target), times the token's incoming grad.
            grad_logits = torch.exp_(logits.sub_(log_sum_exp[start:end, None]))  # softmax, [c, v]
            grad_logits[rows[: end - start], target[start:end]] -= 1.0
            grad_logits.mul_(grad_loss[start:end, None].float())
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), chunk.float())  # [v, h]
        return (grad_hidden,
                grad_weight.to(weight.dtype) if grad_weight is not None else None, None, None)


class _MeanContext(FunctionCtx):
    saved_tensors: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]
    weight_dtype: torch.dtype


class _MeanLinearCrossEntropy(torch.autograd.Function):
    """Mean `cross_entropy(x @ w.T, t)` over chunks of tokens, both gradients made in forward."""

    @staticmethod
    def forward(ctx: _MeanContext, hidden: Tensor, weight: Tensor, target: Tensor,
                chunk_size: int) -> Tensor:
        num_tokens = hidden.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # The matmuls run in hidden's dtype (bf16 weights under autocast are cast once).
        weight_c = weight.to(hidden.dtype)  # [v, h]
        scale = 1.0 / num_tokens
        losses = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # [N]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, h]
        # Summed over chunks in the compute dtype (each chunk's GEMM accumulates in float32);
        # a float32 sum would need float32 GEMMs of the vocabulary-wide gradient.
        grad_weight = torch.zeros_like(weight_c) if need_weight else None  # [v, h]
        fused = hidden.is_cuda and triton_available()
        rows = None if fused else torch.arange(min(chunk_size, num_tokens), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes as given, per chunk
            _mean_chunks(hidden, weight_c, target, chunk_size, scale, fused, rows, losses,
                         grad_hidden, grad_weight)
        saved = [t for t in (grad_hidden, grad_weight) if t is not None]
        ctx.save_for_backward(*saved)
        ctx.weight_dtype = weight.dtype
        return losses.sum() * scale

    @staticmethod
    def backward(ctx: _MeanContext, *grad_outputs: Tensor
                 ) -> tuple[Tensor | None, Tensor | None, None, None]:
        (grad_loss,) = grad_outputs  # []
        saved = iter(ctx.saved_tensors)
        # Scaled by the incoming gradient on the device (usually 1; never read on the host).
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            made = next(saved)  # [N, h]
            grad_hidden = made * grad_loss.to(made.dtype)
        if ctx.needs_input_grad[1]:
            made = next(saved)  # [v, h]
            grad_weight = (made * grad_loss.to(made.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _mean_chunks(hidden: Tensor, weight: Tensor, target: Tensor, chunk_size: int, scale: float,
                 fused: bool, rows: Tensor | None, losses: Tensor, grad_hidden: Tensor | None,
                 grad_weight: Tensor | None) -> None:
    """Fill `losses [N]` and the gradients of `scale * sum(losses)` chunk by chunk."""
    num_tokens = hidden.shape[0]
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        chunk, chunk_target = hidden[start:end], target[start:end]  # [c, h], [c]
        logits = chunk @ weight.t()  # [c, v]
        if fused:
            _triton_cross_entropy().cross_entropy_grad_(logits, chunk_target,
                                                        losses[start:end], scale)
            grad_logits = logits  # overwritten in place by the gradient
        else:
            assert rows is not None
            wide = logits.float()  # [c, v]
            lse = torch.logsumexp(wide, dim=-1)  # [c]
            losses[start:end] = lse - wide.gather(1, chunk_target[:, None]).squeeze(1)
            probs = torch.exp_(wide.sub_(lse[:, None]))  # softmax, [c, v]
            probs[rows[: end - start], chunk_target] -= 1.0
            grad_logits = probs.mul_(scale).to(hidden.dtype)  # [c, v]
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])  # [c, h]
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), chunk)  # [v, h]


def _triton_cross_entropy() -> _TritonCrossEntropy:
    return cast("_TritonCrossEntropy",
                import_optional("protoformer.kernels._cross_entropy_triton"))


class _TritonCrossEntropy(Protocol):
    @staticmethod
    def cross_entropy_grad_(logits: Tensor, target: Tensor, loss: Tensor, scale: float) -> None: ...


class _LigerFusedLinearCrossEntropy(Protocol):
    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
              ce_weight: Tensor | None, ignore_index: int, lse_square_scale: float,
              label_smoothing: float, reduction: str, softcap: float | None,
              return_z_loss: bool, accum_dtype: torch.dtype | None, /) -> tuple[Tensor, ...]: ...


def _check(hidden: Tensor, weight: Tensor, target: Tensor) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit: expected hidden [..., h] and "
                         "weight [vocab, h]")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"fused_linear_cross_entropy: target shape {tuple(target.shape)} must "
                         f"equal hidden's shape {tuple(hidden.shape)} without the last dim")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fused_linear_cross_entropy: target must hold int64 or int32 token "
                        f"ids, got {target.dtype}")
    if target.device.type == "cpu" and target.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(target))
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(f"fused_linear_cross_entropy: target ids must lie in [0, "
                             f"{weight.shape[0]}), got ids from {low} to {high}")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *,
                               chunk_size: int | None = None,
                               reduction: Literal["none", "mean"] = "none") -> Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` against `target`, without full logits.

    `hidden` `[..., h]`, `weight` `[vocab, h]`, `target` `[...]` (ids in `[0, vocab)`) ->
    float32 losses `[...]`, or with `reduction="mean"` their mean `[]` (both gradients made
    in the forward pass, chunk by chunk, with no host synchronisation: `_MeanLinearCrossEntropy`).
    `chunk_size` (tokens per chunk) applies to the PyTorch paths and the mean; the default
    keeps one chunk's float32 logits near 64 MB on CPU and 1 GB on a GPU.
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"fused_linear_cross_entropy: reduction={reduction!r}; expected "
                         "'none' or 'mean'")
    _check(hidden, weight, target)
    lead_shape = tuple(target.shape)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, h]
    flat_target = target.reshape(-1).long()  # [N]
    if flat_hidden.shape[0] == 0:
        empty = torch.zeros(lead_shape, dtype=torch.float32, device=hidden.device)
        return empty.mean() if reduction == "mean" else empty
    if reduction == "mean":
        # Both gradients in the forward pass: no recomputation, no host synchronisation.
        if chunk_size is None:
            chunk_size = _mean_chunk_size(flat_hidden.shape[0], weight.shape[0], hidden.device)
        if chunk_size < 1:
            raise ValueError(f"fused_linear_cross_entropy: chunk_size={chunk_size} must be >= 1")
        return apply_autograd_function(_MeanLinearCrossEntropy, flat_hidden.contiguous(),
                                       weight, flat_target.contiguous(), chunk_size)
    if hidden.is_cuda and liger_available() and chunk_size is None:
        function = cast("_LigerFusedLinearCrossEntropy", import_optional(
            "liger_kernel.ops.fused_linear_cross_entropy").LigerFusedLinearCrossEntropyFunction)
        # No bias, no class weights, ignore_index -100 (never a valid id here), no label
        # smoothing, per-token losses, no softcap, no z-loss; the weight gradient is summed
        # over chunks in float32 (like one unchunked matmul would) and cast once.
        outputs = function.apply(flat_hidden.contiguous(), weight.contiguous(), flat_target,
                                 None, None, -100, 0.0, 0.0, "none", None, False, torch.float32)
        return outputs[0].float().view(lead_shape)  # [...]
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], weight.shape[0], hidden.device)
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size={chunk_size} must be >= 1")
    loss = apply_autograd_function(_ChunkedLinearCrossEntropy, flat_hidden, weight, flat_target,
                                   chunk_size)
    return loss.view(lead_shape)
