"""Normalization layers and their Builder/Interface protocols."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer.config import TransformerConfig
from protoformer.parallel.parameters import mark_sequence_parallel

__all__ = ["IdentityOp", "LayerNorm", "LayerNormBuilder", "LayerNormInterface", "RMSNorm",
           "norm_class"]


class LayerNormInterface(Protocol):
    """A normalization over the last dimension."""

    def forward(self, x: Tensor, /) -> Tensor: ...


class LayerNormBuilder(Protocol):
    """Builds a normalization layer over `hidden_size` features."""

    def __call__(self, hidden_size: int, /, *, config: TransformerConfig, eps: float) -> LayerNormInterface: ...


class LayerNorm(nn.Module):
    """Layer normalization with a learned scale and bias, computed in float32.

    The statistics and the affine transform run in float32 whatever the input dtype (bf16
    statistics lose too much precision); the result is cast back to the input dtype. The
    parameters live in `config.params_dtype`.
    """

    def __init__(self, hidden_size: int, *, config: TransformerConfig, eps: float = 1e-5) -> None:
        super().__init__()
        _check_norm_args("LayerNorm", hidden_size, eps)
        self.hidden_size = hidden_size
        self.eps = eps
        # `layernorm_zero_centered_gamma`: the scale is `1 + weight` (weight starts at 0).
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        start = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(start(hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(config, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """`[..., hidden_size]` -> the same shape and dtype."""
        _check_last_dim("LayerNorm", x, self.hidden_size)
        out = F.layer_norm(x.float(), (self.hidden_size,), self._scale(), self.bias.float(),
                           self.eps)
        return out.to(x.dtype)

    def _scale(self) -> Tensor:
        """The float32 scale: `weight`, or `1 + weight` with a zero-centered gamma."""
        weight = self.weight.float()  # [h]
        return weight + 1.0 if self.zero_centered_gamma else weight

    def extra_repr(self) -> str:
        centered = ", zero_centered_gamma=True" if self.zero_centered_gamma else ""
        return f"{self.hidden_size}, eps={self.eps}{centered}"


class RMSNorm(nn.Module):
    """Root-mean-square normalization (no mean subtraction, no bias), computed in float32.

    `y = x / sqrt(mean(x**2) + eps) * weight`, evaluated in float32 and cast back to the input
    dtype. The scale lives in `config.params_dtype`.
    """

    def __init__(self, hidden_size: int, *, config: TransformerConfig, eps: float = 1e-6) -> None:
        super().__init__()
        _check_norm_args("RMSNorm", hidden_size, eps)
        self.hidden_size = hidden_size
        self.eps = eps
        # `layernorm_zero_centered_gamma` (Gemma): the scale is `1 + weight` (weight starts at 0).
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        start = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(start(hidden_size, dtype=config.params_dtype))
        _mark_sequence_parallel(config, self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """`[..., hidden_size]` -> the same shape and dtype."""
        _check_last_dim("RMSNorm", x, self.hidden_size)
        out = F.rms_norm(x.float(), (self.hidden_size,), self._scale(), self.eps)
        return out.to(x.dtype)

    def _scale(self) -> Tensor:
        """The float32 scale: `weight`, or `1 + weight` with a zero-centered gamma."""
        weight = self.weight.float()  # [h]
        return weight + 1.0 if self.zero_centered_gamma else weight

    def extra_repr(self) -> str:
        centered = ", zero_centered_gamma=True" if self.zero_centered_gamma else ""
        return f"{self.hidden_size}, eps={self.eps}{centered}"


class IdentityOp(nn.Module):
    """A norm slot left empty: returns its input (Megatron-Core's name), e.g. the pre-norms of
    OLMo 2's post-norm layers. Satisfies `LayerNormBuilder`; has no parameters."""

    def __init__(self, hidden_size: int, *, config: TransformerConfig, eps: float = 1e-6) -> None:
        super().__init__()
        del config, eps  # nothing to normalize with
        _check_norm_args("IdentityOp", hidden_size, 1.0)
        self.hidden_size = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        """`[..., hidden_size]` -> `x` itself."""
        _check_last_dim("IdentityOp", x, self.hidden_size)
        return x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}"


def norm_class(config: TransformerConfig) -> LayerNormBuilder:
    """The normalization `config.normalization` names: `LayerNorm` or `RMSNorm`."""
    if config.normalization == "LayerNorm":
        return LayerNorm
    if config.normalization == "RMSNorm":
        return RMSNorm
    raise ValueError(f"config.normalization={config.normalization!r}: expected 'LayerNorm' or "
                     "'RMSNorm'")


def _check_norm_args(name: str, hidden_size: object, eps: float) -> None:
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"{name}(hidden_size={hidden_size!r}): hidden_size must be an int >= 1")
    if not eps > 0.0:
        raise ValueError(f"{name}(eps={eps!r}): eps must be > 0 (it keeps the division finite)")


def _check_last_dim(name: str, x: Tensor, hidden_size: int) -> None:
    if x.dim() == 0 or x.shape[-1] != hidden_size:
        raise ValueError(f"{name} over {hidden_size} features got an input of shape "
                         f"{tuple(x.shape)}; the last dimension must be {hidden_size}")


def _mark_sequence_parallel(config: TransformerConfig, *params: nn.Parameter) -> None:
    # With sequence parallelism each rank normalizes its own slice of the sequence, so the
    # gradients of these replicated parameters must be summed over the tensor-parallel group;
    # their parallel metadata tells `finalize_model_grads` which ones.
    mark_sequence_parallel(params, config.sequence_parallel)
