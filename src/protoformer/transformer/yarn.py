"""Rotary tables of multi-latent attention: plain RoPE and YaRN, as DeepSeek-V2/V3 use them.

YaRN ("Yet another RoPE extensioN", Peng et al. 2023) stretches a rotary table trained on
`original_max_position_embeddings` positions by `rotary_scaling_factor`: the dimensions whose
wavelength is short compared with the original context (more than `beta_fast` rotations)
keep their frequency, those with fewer than `beta_slow` rotations are interpolated (frequency
divided by the factor), and a linear ramp blends the dimensions in between. DeepSeek-V3
additionally scales cos/sin by `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` and
the softmax scale by `mscale(factor, mscale_all_dim) ** 2` (see `mla_softmax_scale`).

Layout. DeepSeek's checkpoints (and Hugging Face's `DeepseekV3` with `rope_interleave=True`,
and Megatron-Core's MLA) store the rotary part of each query/key head as *interleaved pairs*
`(x0, x1), (x2, x3), ...`, pair `i` rotated by frequency `i`. `apply_interleaved_rotary`
takes that layout and returns the rotated vector with the pairs split into halves,
`[x0', x2', ... | x1', x3', ...]`, exactly as Hugging Face does. Queries and keys come out in
the same (halves) layout, so their dot products are those of the interleaved rotation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from protoformer.config import MLATransformerConfig

__all__ = [
    "MLARotaryEmbedding",
    "apply_interleaved_rotary",
    "mla_softmax_scale",
    "rope_inv_freq",
    "yarn_correction_range",
    "yarn_get_mscale",
    "yarn_inv_freq",
]


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor `0.1 * mscale * ln(scale) + 1` (1 when `scale <= 1`)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, base: float) -> Tensor:
    """Plain RoPE frequencies `base ** (-2i / dim)` for `i < dim / 2`, float32 `[dim / 2]`."""
    _check_even_dim(dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim  # [dim / 2]
    return 1.0 / (base**exponents)


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    # The (fractional) dimension index whose wavelength fits `num_rotations` times into
    # `max_position` tokens: solves max_position / (2 pi base^(2d/dim)) = num_rotations for d.
    return dim * math.log(max_position / (num_rotations * 2.0 * math.pi)) / (2.0 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_max_position_embeddings: int) -> tuple[int, int]:
    """The dimension-pair range `[low, high]` over which YaRN ramps from keeping to interpolating.

    Pairs below `low` rotate more than `beta_fast` times over the original context and keep
    their frequency; pairs above `high` rotate fewer than `beta_slow` times and are
    interpolated. Rounded outwards (floor/ceil) and clipped to `[0, dim - 1]`, as DeepSeek does.
    """
    low = math.floor(_correction_dim(beta_fast, dim, base, original_max_position_embeddings))
    high = math.ceil(_correction_dim(beta_slow, dim, base, original_max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, base: float, scaling_factor: float,
                  original_max_position_embeddings: int, beta_fast: float,
                  beta_slow: float) -> Tensor:
    """YaRN frequencies, float32 `[dim / 2]`: a per-pair blend of kept and interpolated RoPE."""
    kept = rope_inv_freq(dim, base)  # [dim / 2], extrapolated: the trained frequencies
    interpolated = kept / scaling_factor  # [dim / 2]
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base,
                                      original_max_position_embeddings)
    span = (high - low) if high != low else 0.001  # a zero-width ramp would divide by zero
    pair = torch.arange(dim // 2, dtype=torch.float32)  # [dim / 2]
    ramp = ((pair - low) / span).clamp(0.0, 1.0)  # 0: keep, 1: interpolate
    return interpolated * ramp + kept * (1.0 - ramp)


def mla_softmax_scale(config: MLATransformerConfig) -> float:
    """The softmax scale of MLA: `config.softmax_scale`, else `1 / sqrt(q_head_dim)` with YaRN's correction.

    With `rope_type="yarn"` and a non-zero `mscale_all_dim`, DeepSeek-V3 multiplies the scale
    by `yarn_get_mscale(rotary_scaling_factor, mscale_all_dim) ** 2`.
    """
    if config.softmax_scale is not None:
        return config.softmax_scale
    scale = 1.0 / math.sqrt(config.q_head_dim)
    if config.rope_type == "yarn" and config.mscale_all_dim:
        correction = yarn_get_mscale(config.rotary_scaling_factor, config.mscale_all_dim)
        scale *= correction * correction
    return scale


class MLARotaryEmbedding(nn.Module):
    """cos/sin tables for the `qk_pos_emb_head_dim` rotary part of MLA's heads.

    Built from the config alone (`rotary_base`, `rope_type` and the YaRN fields); `forward`
    evaluates the table at the given positions, so no maximum length is fixed in advance.
    """

    inv_freq: Tensor

    def __init__(self, config: MLATransformerConfig) -> None:
        super().__init__()
        dim = config.qk_pos_emb_head_dim
        _check_even_dim(dim)
        self.config = config
        self.dim = dim
        self.rope_type = config.rope_type
        self.magnitude = 1.0
        if config.rope_type == "yarn":
            # DeepSeek-V3's `_mscale`: YaRN's attention temperature, folded into cos/sin.
            factor = config.rotary_scaling_factor
            self.magnitude = (yarn_get_mscale(factor, config.mscale)
                              / yarn_get_mscale(factor, config.mscale_all_dim))
        inv_freq = self._inv_freq().to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [dim / 2]

    def _inv_freq(self) -> Tensor:
        config = self.config
        with torch.device("cpu"):  # see RotaryEmbedding: avoid meta-device reference kernels
            if config.rope_type == "yarn":
                return yarn_inv_freq(self.dim, config.rotary_base, config.rotary_scaling_factor,
                                     config.original_max_position_embeddings,
                                     config.beta_fast, config.beta_slow)  # [dim / 2]
            return rope_inv_freq(self.dim, config.rotary_base)  # [dim / 2]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Refill `inv_freq` from the config (`to_empty` leaves the buffer uninitialised)."""
        self.inv_freq.copy_(self._inv_freq())

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Integer positions `[s]` -> (cos, sin), each float32 `[s, dim / 2]` (one angle per pair)."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [s, dim / 2]
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rope_type={self.rope_type!r}, magnitude={self.magnitude:.6g}"


def apply_interleaved_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of `x`'s last dimension; the result has the pairs split in halves.

    `x` is `[..., d]` with pairs `(x[2i], x[2i+1])`; `cos`/`sin` broadcast to `[..., d / 2]`.
    Returns `[x_even * cos - x_odd * sin | x_odd * cos + x_even * sin]`, `[..., d]`, in `x`'s dtype.
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # each [..., d / 2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # [..., d]


def _check_even_dim(dim: int) -> None:
    if dim < 2 or dim % 2 != 0:
        raise ValueError(f"rotary dimension {dim} must be even and >= 2 (it is rotated in pairs); "
                         "set config.qk_pos_emb_head_dim to an even number")
