"""Fused RMSNorm: one kernel for the forward pass and one for the backward pass.

On CUDA with liger-kernel the normalization runs in liger's Triton kernels, with everything
computed in float32 and cast back to the input dtype (its "gemma" casting mode), which is
exactly what `protoformer.transformer.norm.RMSNorm` computes. Elsewhere, and inside a
region `torch.compile` traces (Dynamo cannot trace liger's kernel; Inductor fuses the plain
math with its neighbours instead), the same math runs through
`torch.nn.functional.rms_norm` in float32.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer.kernels.probe import import_optional, liger_available

__all__ = ["fused_rms_norm"]


class _LigerRMSNormFunction(Protocol):
    @staticmethod
    def apply(x: Tensor, weight: Tensor, eps: float, offset: float, casting_mode: str,
              in_place: bool, /) -> Tensor: ...


def fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`x / sqrt(mean(x**2, -1) + eps) * weight` over the last dimension, in float32, cast to `x.dtype`."""
    if not torch.compiler.is_compiling() and x.is_cuda and liger_available():
        function = cast("_LigerRMSNormFunction",
                        import_optional("liger_kernel.ops.rms_norm").LigerRMSNormFunction)
        hidden = x.shape[-1]
        # in_place=False: liger would otherwise write dX over the incoming gradient, which
        # autograd may still hand to another consumer of this norm's output.
        out = function.apply(x.reshape(-1, hidden), weight, eps, 0.0, "gemma", False)
        return out.view(x.shape)
    out = F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps)
    return out.to(x.dtype)
