"""Rotary position embedding (RoPE), Megatron-Core style: one frequency table, applied per layer.

The model builds the table once per forward (`RotaryEmbedding(max_seq_len)` ->
`[s, 1, 1, rot_dim]` angles) and every attention layer rotates its queries and keys with
`apply_rotary_pos_emb`. Two channel layouts are supported:

- non-interleaved (GPT-NeoX / Llama "rotate_half"): channel `i` pairs with `i + rot_dim / 2`;
  the table is `cat(freqs, freqs)`.
- interleaved (GPT-J / original RoFormer): channel `2i` pairs with `2i + 1`; the table
  repeats each frequency twice in place, `[f0, f0, f1, f1, ...]`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from protoformer.config import RopeScaling, TransformerConfig

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb", "llama3_scaled_inv_freq", "rotary_emb_from_config"]


class RotaryEmbedding(nn.Module):
    """Rotation angles of RoPE for positions `offset ... offset + max_seq_len - 1`.

    `rot_dim = int(kv_channels * rotary_percent)` channels of each head rotate (partial
    rotary leaves the rest unchanged); it must be even. Frequencies are
    `rotary_base ** (-2i / rot_dim)`. `rope_scaling` rescales them: `"llama3"` (or True) by
    the Llama 3.1 rule (`llama3_scaled_inv_freq`); `"linear"` divides them by
    `rope_scaling_factor`; `"dynamic"` (dynamic NTK) raises the base for a table longer than
    `original_max_position_embeddings` `L`: for `n` positions the base is
    `rotary_base * (factor * n / L - (factor - 1)) ** (rot_dim / (rot_dim - 2))`, so a table
    depends on its length (as transformers' "dynamic" rope, whose cached keys keep the angles
    they were rotated with); `"longrope"` (Phi-3's LongRoPE) divides frequency `i` by
    `short_factor[i]`, or by `long_factor[i]` for a table longer than `L` (again per table
    length, as transformers picks the factors by the largest position of each forward).
    `attention_factor` is not applied here: `apply_rotary_pos_emb(mscale=...)` multiplies
    cos and sin by it. `seq_len_interpolation_factor` divides the positions
    (linear position interpolation).
    """

    inv_freq: Tensor
    long_inv_freq: Tensor

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: float | None = None,
        rotary_base: float = 10000.0,
        rope_scaling: bool | RopeScaling | None = False,
        rope_scaling_factor: float = 8.0,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_position_embeddings: int = 8192,
        short_factor: tuple[float, ...] | None = None,
        long_factor: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        if kv_channels < 1:
            raise ValueError(f"RotaryEmbedding(kv_channels={kv_channels}): must be >= 1")
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"RotaryEmbedding(rotary_percent={rotary_percent}): must be in (0, 1]")
        rot_dim = int(kv_channels * rotary_percent)
        if rot_dim < 2 or rot_dim % 2 != 0:
            raise ValueError(
                f"RotaryEmbedding: kv_channels={kv_channels} x rotary_percent={rotary_percent} "
                f"gives {rot_dim} rotary channels; it must be an even number >= 2 (channels "
                "rotate in pairs). Choose rotary_percent so that the product is even")
        if not rotary_base > 0.0:
            raise ValueError(f"RotaryEmbedding(rotary_base={rotary_base}): must be > 0")
        if seq_len_interpolation_factor is not None and not seq_len_interpolation_factor > 0.0:
            raise ValueError(f"RotaryEmbedding(seq_len_interpolation_factor="
                             f"{seq_len_interpolation_factor}): must be > 0 or None")

        self.kv_channels = kv_channels
        self.rot_dim = rot_dim
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        kind: RopeScaling | None = "llama3" if rope_scaling is True else (rope_scaling or None)
        if kind not in (None, "llama3", "linear", "dynamic", "longrope"):
            raise ValueError(f"RotaryEmbedding(rope_scaling={rope_scaling!r}): expected None, "
                             "'llama3', 'linear', 'dynamic' or 'longrope'")
        if kind == "longrope":
            for name, factors in (("short_factor", short_factor), ("long_factor", long_factor)):
                if factors is None or len(factors) != rot_dim // 2:
                    raise ValueError(f"RotaryEmbedding(rope_scaling='longrope'): {name} must "
                                     f"hold {rot_dim // 2} factors (one per rotary channel "
                                     f"pair), got {factors!r}")
        self.rope_scaling = kind
        self.rotary_base = rotary_base
        self.rope_scaling_factor = rope_scaling_factor
        self.original_max_position_embeddings = original_max_position_embeddings

        # Computed on the CPU and moved: under a meta-device context the factory calls would
        # otherwise run torch's reference kernels, which cost about a second on first use.
        with torch.device("cpu"):
            inv_freq = _inv_freq(rot_dim, rotary_base)  # [rot_dim / 2]
            long_inv_freq = inv_freq
            if kind == "longrope":
                assert short_factor is not None and long_factor is not None
                long_inv_freq = _inv_freq(rot_dim, rotary_base, factors=long_factor)
                inv_freq = _inv_freq(rot_dim, rotary_base, factors=short_factor)
            if kind == "linear":
                inv_freq = inv_freq / rope_scaling_factor
            elif kind == "llama3":
                inv_freq = llama3_scaled_inv_freq(
                    inv_freq,
                    factor=rope_scaling_factor,
                    low_freq_factor=low_freq_factor,
                    high_freq_factor=high_freq_factor,
                    original_max_position_embeddings=original_max_position_embeddings,
                )
        inv_freq = inv_freq.to(torch.get_default_device())
        # Not persistent: it is a pure function of the constructor arguments, so checkpoints
        # need not carry it (and stay loadable when the formula's float rounding changes).
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # LongRoPE's frequencies past the original length (equal to inv_freq otherwise).
        self.register_buffer("long_inv_freq", long_inv_freq.to(inv_freq.device),
                             persistent=False)

    @property
    def recompute_after(self) -> int | None:
        """The sequence length past which the angles of *every* position change (LongRoPE's
        switch to the long factors), or None. Keys cached at or below that length were
        rotated by the short factors: decoding that crosses it re-runs the whole sequence,
        as transformers' Phi-3 generation does."""
        return self.original_max_position_embeddings if self.rope_scaling == "longrope" else None

    def forward(self, max_seq_len: int, offset: int = 0) -> Tensor:
        """Angles `[max_seq_len, 1, 1, rot_dim]` (float32) for positions `offset + 0 ...`."""
        if max_seq_len < 1 or offset < 0:
            raise ValueError(f"RotaryEmbedding(max_seq_len={max_seq_len}, offset={offset}): "
                             "max_seq_len must be >= 1 and offset >= 0")
        positions = torch.arange(max_seq_len, device=self.inv_freq.device, dtype=torch.float32)
        positions = positions + offset  # [s]
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        inv_freq = self.inv_freq.float()  # [rot_dim / 2]
        length = offset + max_seq_len
        if self.rope_scaling == "dynamic" and length > self.original_max_position_embeddings:
            factor, dim = self.rope_scaling_factor, self.rot_dim
            growth = factor * length / self.original_max_position_embeddings - (factor - 1.0)
            inv_freq = _inv_freq(dim, self.rotary_base * growth ** (dim / (dim - 2)),
                                 device=inv_freq.device)  # [rot_dim / 2]
        if self.rope_scaling == "longrope" and length > self.original_max_position_embeddings:
            inv_freq = self.long_inv_freq.float()  # [rot_dim / 2]
        freqs = torch.outer(positions, inv_freq)  # [s, rot_dim / 2]
        if self.rotary_interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)  # [s, rot_dim]: f0, f0, f1, f1, ...
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # [s, rot_dim]: f0, f1, ..., f0, f1, ...
        return emb[:, None, None, :]  # [s, 1, 1, rot_dim]

    def extra_repr(self) -> str:
        scaling = "" if self.rope_scaling is None else f", rope_scaling={self.rope_scaling!r}"
        return (f"kv_channels={self.kv_channels}, rot_dim={self.rot_dim}, "
                f"interleaved={self.rotary_interleaved}{scaling}")


def _inv_freq(rot_dim: int, base: float, device: torch.device | None = None, *,
              factors: tuple[float, ...] | None = None) -> Tensor:
    """`base ** (-2i / rot_dim)` for `i < rot_dim / 2`, float32 (the exponent is computed as
    transformers does, integer steps divided by `rot_dim`), divided by `factors[i]` if given."""
    steps = torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float()  # [rot_dim / 2]
    if factors is not None:
        scale = torch.tensor(factors, dtype=torch.float32, device=device)  # [rot_dim / 2]
        return 1.0 / (scale * base ** (steps / rot_dim))
    return 1.0 / (base ** (steps / rot_dim))


def llama3_scaled_inv_freq(
    inv_freq: Tensor,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> Tensor:
    """Llama 3.1 frequency scaling: slow frequencies divided by `factor`, fast ones kept.

    With `L = original_max_position_embeddings` and wavelength `w = 2 pi / inv_freq`:
    `w < L / high_freq_factor` keeps the frequency; `w > L / low_freq_factor` divides it by
    `factor`; in between it blends the two with weight
    `s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)` on the original:
    `(1 - s) * inv_freq / factor + s * inv_freq`.
    """
    if not factor > 0.0:
        raise ValueError(f"llama3 rope scaling: factor={factor} must be > 0")
    if not 0.0 < low_freq_factor < high_freq_factor:
        raise ValueError(f"llama3 rope scaling: need 0 < low_freq_factor ({low_freq_factor}) < "
                         f"high_freq_factor ({high_freq_factor})")
    if original_max_position_embeddings < 1:
        raise ValueError(f"llama3 rope scaling: original_max_position_embeddings="
                         f"{original_max_position_embeddings} must be >= 1")
    context = float(original_max_position_embeddings)
    wavelen = 2.0 * math.pi / inv_freq
    keeps = wavelen < context / high_freq_factor  # high frequencies: unchanged
    divides = wavelen > context / low_freq_factor  # low frequencies: fully interpolated
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(divides, inv_freq / factor, blended)
    return torch.where(keeps, inv_freq, scaled)


def rotary_emb_from_config(config: TransformerConfig) -> RotaryEmbedding:
    """The `RotaryEmbedding` for a model with `config`'s head size and rotary options."""
    return RotaryEmbedding(
        config.head_dim,
        rotary_percent=config.rotary_percent,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=config.rotary_base,
        rope_scaling=config.rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_low_freq_factor,
        high_freq_factor=config.rope_high_freq_factor,
        original_max_position_embeddings=config.rope_original_max_position_embeddings,
        short_factor=config.rope_short_factor,
        long_factor=config.rope_long_factor,
    )


def _rotate_half(x: Tensor, *, rotary_interleaved: bool) -> Tensor:
    """The partner of each channel with the sign of a 90-degree rotation: (x1, x2) -> (-x2, x1)."""
    if rotary_interleaved:
        first, second = x[..., 0::2], x[..., 1::2]  # [..., rot_dim / 2] each
        return torch.stack((-second, first), dim=-1).flatten(-2)  # [..., rot_dim]
    first, second = x.chunk(2, dim=-1)  # [..., rot_dim / 2] each
    return torch.cat((-second, first), dim=-1)  # [..., rot_dim]


def apply_rotary_pos_emb(
    t: Tensor, freqs: Tensor, *, rotary_interleaved: bool = False, mscale: float = 1.0
) -> Tensor:
    """Rotate the first `rot_dim` channels of each head of `t` by the angles in `freqs`.

    `t` is `[s, b, n, d]`; `freqs` is `[S, 1, 1, rot_dim]` from `RotaryEmbedding` (dims 1 and
    2 may also be `b` and `n`) with `S >= s`; its first `s` positions are used, so slice it
    first (`freqs[offset:]`) when `t` starts at a later position. Channels `rot_dim ...`
    pass through unchanged. The rotation runs in float32 and the result has `t`'s dtype.
    `mscale` multiplies cos and sin (the YaRN attention-magnitude correction); 1 for plain RoPE.
    """
    if t.dim() != 4:
        raise ValueError(f"apply_rotary_pos_emb: t must be [s, b, n, d], got shape {tuple(t.shape)}")
    if freqs.dim() != 4:
        raise ValueError(f"apply_rotary_pos_emb: freqs must be [s, 1, 1, rot_dim] (from "
                         f"RotaryEmbedding), got shape {tuple(freqs.shape)}")
    seq_len, batch, heads, head_dim = t.shape
    table_len, rot_dim = freqs.shape[0], freqs.shape[-1]
    if table_len < seq_len:
        raise ValueError(
            f"apply_rotary_pos_emb: sequence length {seq_len} exceeds the rotary table of "
            f"{table_len} positions; build the table with max_seq_len >= {seq_len}")
    if rot_dim % 2 != 0 or rot_dim > head_dim:
        raise ValueError(f"apply_rotary_pos_emb: freqs has {rot_dim} channels; expected an even "
                         f"number <= the head size {head_dim} of t {tuple(t.shape)}")
    if freqs.shape[1] not in (1, batch) or freqs.shape[2] not in (1, heads):
        raise ValueError(f"apply_rotary_pos_emb: freqs of shape {tuple(freqs.shape)} does not "
                         f"broadcast to t of shape {tuple(t.shape)}; expected [s, 1, 1, rot_dim]")

    angles = freqs[:seq_len].float()  # [s, 1, 1, rot_dim]
    cos = torch.cos(angles) * mscale
    sin = torch.sin(angles) * mscale
    x = t[..., :rot_dim].float()  # [s, b, n, rot_dim]
    rotated = x * cos + _rotate_half(x, rotary_interleaved=rotary_interleaved) * sin
    rotated = rotated.to(t.dtype)
    if rot_dim == head_dim:
        return rotated
    return torch.cat((rotated, t[..., rot_dim:]), dim=-1)  # [s, b, n, d]
