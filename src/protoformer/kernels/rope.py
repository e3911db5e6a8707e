"""Fused rotary position embedding: one kernel reads a head tensor once and writes it rotated.

`fused_apply_rotary_pos_emb(t, freqs)` computes what
`protoformer.transformer.rope.apply_rotary_pos_emb(t, freqs)` computes (same argument
layout, float32 rotation, result in `t`'s dtype). On a CUDA tensor with the non-interleaved
(Llama / GPT-NeoX) layout it runs one Triton kernel per call (forward and backward), reading
`t` through its strides, so the strided query/key views of a fused QKV projection need no
copy first; elsewhere (CPU, interleaved layout, no Triton, or inside a region `torch.compile`
traces, where Inductor fuses it) the same math runs in PyTorch.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from protoformer.kernels.probe import import_optional, triton_available
from protoformer.parallel.mappings import apply_autograd_function

__all__ = ["fused_apply_rotary_pos_emb", "fused_apply_rotary_pos_emb_pair"]


class _TritonRope(Protocol):
    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, /, *, backward: bool) -> Tensor: ...


def _triton_rope() -> _TritonRope:
    module = import_optional("protoformer.kernels._rope_triton")
    return cast("_TritonRope", module.rope)


class _RopeContext(FunctionCtx):
    saved_tensors: tuple[Tensor, ...]


class _TritonRotary(torch.autograd.Function):
    """Autograd wrapper of the Triton kernel: the backward pass rotates the gradient back."""

    @staticmethod
    def forward(ctx: _RopeContext, t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _triton_rope()(t, cos, sin, backward=False)  # [s, b, n, d]

    @staticmethod
    def backward(ctx: _RopeContext, *grad_outputs: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = grad_outputs
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return _triton_rope()(grad, cos, sin, backward=True), None, None


def _check(t: Tensor, freqs: Tensor) -> int:
    """Validate shapes as the reference does; return `rot_dim`."""
    if t.dim() != 4:
        raise ValueError(f"fused_apply_rotary_pos_emb: t must be [s, b, n, d], got shape "
                         f"{tuple(t.shape)}")
    if freqs.dim() != 4 or freqs.shape[1] != 1 or freqs.shape[2] != 1:
        raise ValueError(f"fused_apply_rotary_pos_emb: freqs must be [s, 1, 1, rot_dim] (from "
                         f"RotaryEmbedding), got shape {tuple(freqs.shape)}")
    seq, head_dim = t.shape[0], t.shape[3]
    if freqs.shape[0] < seq:
        raise ValueError(f"fused_apply_rotary_pos_emb: sequence length {seq} exceeds the rotary "
                         f"table of {freqs.shape[0]} positions; build the table with "
                         f"max_seq_len >= {seq}")
    rot_dim = freqs.shape[-1]
    if rot_dim % 2 != 0 or rot_dim > head_dim:
        raise ValueError(f"fused_apply_rotary_pos_emb: freqs has {rot_dim} channels; expected "
                         f"an even number <= the head size {head_dim} of t {tuple(t.shape)}")
    return rot_dim


def _rotate_torch(t: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> Tensor:
    """The rotation in PyTorch: `cos`/`sin` are `[s, 1, 1, rot / 2]` float32."""
    rot = 2 * cos.shape[-1]
    x = t[..., :rot].float()  # [s, b, n, rot]
    if interleaved:
        first, second = x[..., 0::2], x[..., 1::2]  # channel 2i pairs with 2i + 1
        rotated = torch.stack((first * cos - second * sin, second * cos + first * sin),
                              dim=-1).flatten(-2)  # [s, b, n, rot]
    else:
        first, second = x.chunk(2, dim=-1)  # channel i pairs with i + rot / 2
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    rotated = rotated.to(t.dtype)
    if rot == t.shape[-1]:
        return rotated
    return torch.cat((rotated, t[..., rot:]), dim=-1)  # [s, b, n, d]


def fused_apply_rotary_pos_emb(t: Tensor, freqs: Tensor, *, rotary_interleaved: bool = False) -> Tensor:
    """Rotate the first `rot_dim` channels of each head of `t` `[s, b, n, d]` by `freqs`.

    Same contract as `protoformer.transformer.rope.apply_rotary_pos_emb` (with `mscale=1`):
    `freqs` is the `[S, 1, 1, rot_dim]` angle table (`S >= s`, first `s` rows used); the
    rotation runs in float32 and the result has `t`'s dtype.
    """
    rot_dim = _check(t, freqs)
    cos, sin = _cos_sin(freqs, t.shape[0], rot_dim, rotary_interleaved)
    return _rotate(t, cos, sin, rotary_interleaved)


def fused_apply_rotary_pos_emb_pair(query: Tensor, key: Tensor, freqs: Tensor, *,
                                    rotary_interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """`fused_apply_rotary_pos_emb` of a query and a key `[s, b, n | ng, d]` by one table:
    the angles' cos/sin are computed once for both (two kernels fewer per layer)."""
    rot_dim = _check(query, freqs)
    if _check(key, freqs) != rot_dim or key.shape[0] != query.shape[0]:
        raise ValueError(f"fused_apply_rotary_pos_emb_pair: query {tuple(query.shape)} and key "
                         f"{tuple(key.shape)} must share the sequence length")
    cos, sin = _cos_sin(freqs, query.shape[0], rot_dim, rotary_interleaved)
    return (_rotate(query, cos, sin, rotary_interleaved),
            _rotate(key, cos, sin, rotary_interleaved))


def _cos_sin(freqs: Tensor, seq: int, rot_dim: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """cos/sin `[s, rot / 2]` (float32) of the first `seq` rows of the angle table."""
    # Every frequency appears twice in the table (`cat(f, f)` or `f0, f0, f1, f1, ...`);
    # cos/sin of one copy, computed by torch as the reference does.
    angles = freqs[:seq, 0, 0].float()  # [s, rot]
    angles = angles[:, 0::2] if interleaved else angles[:, :rot_dim // 2]  # [s, rot / 2]
    return torch.cos(angles), torch.sin(angles)  # [s, rot / 2] each


def _rotate(t: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    # Inside a region torch.compile traces, the plain math: Inductor fuses it with its neighbours.
    if not torch.compiler.is_compiling() and t.is_cuda and not interleaved and triton_available():
        if t.stride(-1) != 1:
            t = t.contiguous()
        return apply_autograd_function(_TritonRotary, t, cos.contiguous(), sin.contiguous())
    return _rotate_torch(t, cos[:, None, None, :], sin[:, None, None, :],
                         interleaved=interleaved)
