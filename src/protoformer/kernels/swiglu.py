"""Fused SwiGLU: `silu(gate) * up` of a `[..., 2f]` (gate then up) tensor in one kernel.

On CUDA with liger-kernel it reads the gate and up halves straight out of the fused `fc1`
output (no chunk copies) and recomputes the SiLU in backward instead of storing it. Elsewhere,
and inside a region `torch.compile` traces (Inductor fuses the plain ops itself), it is the
plain `F.silu(gate) * up`.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer.kernels.probe import import_optional, liger_available

__all__ = ["fused_swiglu"]


class _LigerFusedGateUpSiLUMul(Protocol):
    @staticmethod
    def apply(x: Tensor, in_place: bool, /) -> Tensor: ...


def fused_swiglu(x: Tensor) -> Tensor:
    """`[..., 2f]` (gate half, then up half) -> `silu(gate) * up` `[..., f]`."""
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"fused_swiglu needs an even last dimension (gate then up), got shape "
                         f"{tuple(x.shape)}")
    if not torch.compiler.is_compiling() and x.is_cuda and liger_available():
        function = cast("_LigerFusedGateUpSiLUMul",
                        import_optional("liger_kernel.ops.swiglu").LigerFusedGateUpSiLUMulFunction)
        # liger's backward returns the gradient flattened to 2-D, so hand it 2-D input.
        width = x.shape[-1]
        out = function.apply(x.reshape(-1, width), False)  # [N, f]
        return out.view(*x.shape[:-1], width // 2)  # [..., f]
    gate, up = torch.chunk(x, 2, dim=-1)  # each [..., f]
    return F.silu(gate) * up
