"""RotaryEmbedding / apply_rotary_pos_emb against a naive complex rotation and Hugging Face."""

from __future__ import annotations

import cmath
import math
import os

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.transformer.rope import (
    RotaryEmbedding,
    apply_rotary_pos_emb,
    rotary_emb_from_config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- independent reference


def naive_inv_freq(rot_dim: int, base: float) -> list[float]:
    return [base ** (-(2 * i) / rot_dim) for i in range(rot_dim // 2)]


def naive_llama3(freqs: list[float], factor: float, low: float, high: float, context: int) -> list[float]:
    """The published Llama 3.1 rule, one frequency at a time in float64."""
    low_wavelen, high_wavelen = context / low, context / high
    out: list[float] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def naive_rotate(t: torch.Tensor, inv_freq: list[float], *, interleaved: bool,
                 positions: list[float]) -> torch.Tensor:
    """Rotate each channel pair of `t` [s, b, n, d] as a complex number, position by position."""
    s, b, n, d = t.shape
    half = len(inv_freq)
    out = t.double().clone()
    src = t.double()
    for p in range(s):
        for i, freq in enumerate(inv_freq):
            a, c = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            rotation = cmath.exp(1j * positions[p] * freq)
            for bi in range(b):
                for ni in range(n):
                    z = complex(src[p, bi, ni, a].item(), src[p, bi, ni, c].item()) * rotation
                    out[p, bi, ni, a] = z.real
                    out[p, bi, ni, c] = z.imag
    assert d >= 2 * half
    return out


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_rotation_matches_naive_complex_rotation(interleaved: bool, rotary_percent: float) -> None:
    torch.manual_seed(0)
    d = 16
    rope = RotaryEmbedding(d, rotary_percent=rotary_percent, rotary_interleaved=interleaved,
                           rotary_base=100.0)
    s = 7
    t = torch.randn(s, 2, 3, d)
    freqs = rope(s)
    assert freqs.shape == (s, 1, 1, int(d * rotary_percent))
    got = apply_rotary_pos_emb(t, freqs, rotary_interleaved=interleaved)
    rot_dim = int(d * rotary_percent)
    want = naive_rotate(t, naive_inv_freq(rot_dim, 100.0), interleaved=interleaved,
                        positions=[float(p) for p in range(s)])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Partial rotary: the channels past rot_dim pass through untouched.
    torch.testing.assert_close(got[..., rot_dim:], t[..., rot_dim:], atol=0, rtol=0)


def test_layouts_are_permutations_of_each_other() -> None:
    torch.manual_seed(1)
    d = 8
    t = torch.randn(5, 1, 2, d)
    plain = apply_rotary_pos_emb(t, RotaryEmbedding(d)(5))
    # Interleaved pairs (2i, 2i+1) correspond to rotate_half pairs (i, i + d/2).
    to_interleaved = torch.tensor([i // 2 + (d // 2) * (i % 2) for i in range(d)])
    interleaved = apply_rotary_pos_emb(t[..., to_interleaved], RotaryEmbedding(d, rotary_interleaved=True)(5),
                                       rotary_interleaved=True)
    torch.testing.assert_close(interleaved, plain[..., to_interleaved])


def test_llama3_scaling_matches_published_formula() -> None:
    d = 16
    factor, low, high, context = 8.0, 1.0, 4.0, 8192
    rope = RotaryEmbedding(d, rotary_base=10000.0, rope_scaling=True, rope_scaling_factor=factor,
                           low_freq_factor=low, high_freq_factor=high,
                           original_max_position_embeddings=context)
    plain = naive_inv_freq(d, 10000.0)
    want = naive_llama3(plain, factor, low, high, context)
    # The chosen sizes exercise all three regimes: kept, divided, and blended.
    assert any(w == p for w, p in zip(want, plain, strict=True))
    assert any(math.isclose(w, p / factor) for w, p in zip(want, plain, strict=True))
    assert any(p / factor < w < p for w, p in zip(want, plain, strict=True))
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    t = torch.randn(4, 1, 1, d)
    got = apply_rotary_pos_emb(t, rope(4, offset=9000))
    ref = naive_rotate(t, want, interleaved=False, positions=[9000.0 + p for p in range(4)])
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=0)  # angles ~ 9000 rad in fp32


def test_offset_and_interpolation_shift_and_scale_positions() -> None:
    rope = RotaryEmbedding(8)
    torch.testing.assert_close(rope(4, offset=3), rope(7)[3:])
    scaled = RotaryEmbedding(8, seq_len_interpolation_factor=2.0)
    want = torch.outer(torch.arange(6.0) / 2.0, torch.tensor(naive_inv_freq(8, 10000.0)))
    torch.testing.assert_close(scaled(6)[:, 0, 0, :4], want.float())


def test_low_precision_input_keeps_dtype_and_accuracy() -> None:
    torch.manual_seed(2)
    t = torch.randn(6, 2, 2, 8)
    freqs = RotaryEmbedding(8)(6)
    got = apply_rotary_pos_emb(t.bfloat16(), freqs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), apply_rotary_pos_emb(t, freqs), atol=3e-2, rtol=2e-2)


def test_longer_table_uses_leading_positions_and_short_table_is_an_error() -> None:
    rope = RotaryEmbedding(8)
    t = torch.randn(5, 1, 1, 8)
    torch.testing.assert_close(apply_rotary_pos_emb(t, rope(12)), apply_rotary_pos_emb(t, rope(5)))
    with pytest.raises(ValueError, match=r"sequence length 300 exceeds the rotary table of 256 "
                                         r"positions; build the table with max_seq_len >= 300"):
        apply_rotary_pos_emb(torch.zeros(300, 1, 1, 8), rope(256))


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(10, rotary_percent=0.5)  # 5 channels cannot pair up
    with pytest.raises(ValueError, match=r"\[s, b, n, d\]"):
        apply_rotary_pos_emb(torch.zeros(4, 8), RotaryEmbedding(8)(4))
    with pytest.raises(ValueError, match="head size"):
        apply_rotary_pos_emb(torch.zeros(4, 1, 1, 4), RotaryEmbedding(8)(4))


def test_rotary_emb_from_config_reads_the_rotary_fields() -> None:
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               rotary_base=500000.0, rotary_percent=0.5, rotary_interleaved=True,
                               rope_scaling="llama3", rope_scaling_factor=4.0,
                               rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                               rope_original_max_position_embeddings=64)
    rope = rotary_emb_from_config(config)
    assert rope.rot_dim == 8 and rope.rotary_interleaved
    want = naive_llama3(naive_inv_freq(8, 500000.0), 4.0, 2.0, 8.0, 64)
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=0)


# ---------------------------------------------------------------- Hugging Face

def _hf_rotate(rotary: torch.nn.Module, apply: object, t: torch.Tensor) -> torch.Tensor:
    """Run HF's rotary module and apply function on `t` [s, b, n, d] (HF layout [b, n, s, d])."""
    s, b = t.shape[0], t.shape[1]
    hf_t = t.permute(1, 2, 0, 3)  # [b, n, s, d]
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    cos, sin = rotary(hf_t, positions)
    assert callable(apply)
    rotated, _ = apply(hf_t, hf_t, cos, sin)
    return rotated.permute(2, 0, 1, 3)  # [s, b, n, d]


@pytest.mark.parametrize("rope_scaling", [False, True])
def test_matches_hugging_face_llama(rope_scaling: bool) -> None:
    pytest.importorskip("transformers", minversion="5.0")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    head_dim, base = 32, 500000.0
    rope_parameters: dict[str, object] = {"rope_type": "default", "rope_theta": base}
    if rope_scaling:
        rope_parameters = {"rope_type": "llama3", "rope_theta": base, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 512}
    hf_config = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=head_dim,
                            max_position_embeddings=4096, rope_parameters=rope_parameters)
    hf_rotary = LlamaRotaryEmbedding(hf_config)

    ours = RotaryEmbedding(head_dim, rotary_base=base, rope_scaling=rope_scaling,
                           rope_scaling_factor=8.0, original_max_position_embeddings=512)
    torch.testing.assert_close(ours.inv_freq, hf_rotary.inv_freq)
    torch.manual_seed(3)
    t = torch.randn(40, 2, 3, head_dim)
    got = apply_rotary_pos_emb(t, ours(40))
    torch.testing.assert_close(got, _hf_rotate(hf_rotary, hf_apply, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_matches_hugging_face_partial_rotary(rope_type: str) -> None:
    pytest.importorskip("transformers", minversion="5.0")
    from transformers import GPTNeoXConfig, LlamaConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, base, fraction = 32, 10000.0, 0.25
    hf_rotary: torch.nn.Module
    if rope_type == "default":
        neox = GPTNeoXConfig(hidden_size=128, num_attention_heads=4,
                             rope_parameters={"rope_type": "default", "rope_theta": base,
                                              "partial_rotary_factor": fraction})
        hf_rotary = GPTNeoXRotaryEmbedding(neox)
    else:
        llama = LlamaConfig(hidden_size=128, num_attention_heads=4, head_dim=head_dim,
                            max_position_embeddings=4096,
                            rope_parameters={"rope_type": "llama3", "rope_theta": base,
                                             "factor": 16.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 256,
                                             "partial_rotary_factor": fraction})
        hf_rotary = LlamaRotaryEmbedding(llama)
    ours = RotaryEmbedding(head_dim, rotary_percent=fraction, rotary_base=base,
                           rope_scaling=rope_type == "llama3", rope_scaling_factor=16.0,
                           original_max_position_embeddings=256)
    assert ours.rot_dim == 8
    torch.manual_seed(4)
    t = torch.randn(30, 2, 2, head_dim)
    # GPT-NeoX's apply function rotates the leading channels and passes the rest through.
    want = _hf_rotate(hf_rotary, neox_apply, t)
    torch.testing.assert_close(apply_rotary_pos_emb(t, ours(30)), want, atol=1e-5, rtol=1e-5)
