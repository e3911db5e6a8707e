"""MultiLatentAttention against an independent einsum reference and Hugging Face's DeepseekV3Attention.

The reference below reads only the layer's weights: it expands keys/values per head (never the
absorbed form), rotates with complex numbers on interleaved pairs, and recomputes the YaRN
frequencies and magnitudes from the formulas of the YaRN paper / DeepSeek-V3 in plain Python.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from protoformer import MLATransformerConfig, TransformerConfig
from protoformer.backends import get_backend
from protoformer.parallel.layers import ColumnParallelLinear, Linear, RowParallelLinear
from protoformer.recipes.mla import mla_layer_spec, mla_self_attention_spec
from protoformer.spec import SpecError, check_builder
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import AttentionBuilder, CoreAttentionBuilder
from protoformer.transformer.layer import TransformerLayer
from protoformer.transformer.mla import MLASelfAttentionSubmodules, MultiLatentAttention
from protoformer.transformer.norm import RMSNorm
from protoformer.transformer.yarn import yarn_get_mscale

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_config(**overrides: Any) -> MLATransformerConfig:
    fields: dict[str, Any] = {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "q_lora_rank": 24, "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8,
        "v_head_dim": 12, "rope_type": "yarn", "rotary_scaling_factor": 40.0,
        "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "layernorm_epsilon": 1e-6,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "add_bias_linear": False,
    }
    fields.update(overrides)
    return MLATransformerConfig(**fields)


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Scale-0.3 random parameters (norm weights included), so every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def build_mla(config: MLATransformerConfig, *, core: CoreAttentionBuilder = SDPAttention,
              mask_type: AttnMaskType = AttnMaskType.causal, seed: int = 0,
              **slots: Any) -> MultiLatentAttention:
    spec = dataclasses.replace(mla_self_attention_spec(get_backend("local"), config),
                               core_attention=core, **slots)
    layer = MultiLatentAttention(config, spec, layer_number=1, attn_mask_type=mask_type).eval()
    randomize(layer, seed)
    return layer


def weight(layer: nn.Module, name: str) -> Tensor:
    w = getattr(layer, name).weight
    assert isinstance(w, Tensor)
    return w.detach()


# ---------------------------------------------------------------- the independent reference

def reference_inv_freq(config: MLATransformerConfig) -> tuple[list[float], float]:
    """Per-pair rotary frequencies and the cos/sin magnitude, in plain Python floats."""
    d, base = config.qk_pos_emb_head_dim, config.rotary_base
    freqs = [base ** (-2.0 * i / d) for i in range(d // 2)]
    if config.rope_type == "rope":
        return freqs, 1.0
    factor, original = config.rotary_scaling_factor, config.original_max_position_embeddings

    def pair_with_rotations(n: float) -> float:  # pair index whose wave turns n times
        return d * math.log(original / (n * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_with_rotations(config.beta_fast)), 0)
    high = min(math.ceil(pair_with_rotations(config.beta_slow)), d - 1)
    blended = []
    for i, f in enumerate(freqs):
        t = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)  # 0 keep .. 1 interpolate
        blended.append(f * (1 - t) + f / factor * t)

    def m(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    return blended, m(config.mscale) / m(config.mscale_all_dim)


def rotate_pairs(x: Tensor, positions: Tensor, config: MLATransformerConfig) -> Tensor:
    """Rotate interleaved pairs of `x` `[s, b, ..., d]` as complex numbers; interleaved output."""
    freqs, magnitude = reference_inv_freq(config)
    angles = positions.double()[:, None] * torch.tensor(freqs, dtype=torch.float64)  # [s, d/2]
    rotation = torch.polar(torch.full_like(angles, magnitude), angles)  # [s, d/2] complex
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1] // 2,)
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rotation.view(shape)).flatten(-2).to(x.dtype)


def rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mla(layer: MultiLatentAttention, x: Tensor, offset: int = 0,
                  mask: Tensor | None = None) -> Tensor:
    """`[s, b, h]` -> `[s, b, h]`, causal, bias of linear_proj included; keys expanded per head."""
    c = layer.config
    s, b, _ = x.shape
    heads, dn, dr, dv, r = (c.num_attention_heads, c.qk_head_dim, c.qk_pos_emb_head_dim,
                            c.v_head_dim, c.kv_lora_rank)
    positions = torch.arange(offset, offset + s)

    def lin(name: str, t: Tensor) -> Tensor:
        module = getattr(layer, name)
        out = torch.einsum("sbi,oi->sbo", t, weight(layer, name))
        bias = getattr(module, "bias", None)
        return out + bias.detach() if isinstance(bias, Tensor) else out

    if c.q_lora_rank is None:
        q = lin("linear_q_proj", x)
    else:
        q_c = rms(lin("linear_q_down_proj", x), weight(layer, "q_layernorm"), c.layernorm_epsilon)
        q = lin("linear_q_up_proj", q_c)
    q = q.view(s, b, heads, dn + dr)
    q_nope, q_pe = q[..., :dn], rotate_pairs(q[..., dn:], positions, c)

    latent = lin("linear_kv_down_proj", x)
    c_kv = rms(latent[..., :r], weight(layer, "kv_layernorm"), c.layernorm_epsilon)
    k_pe = rotate_pairs(latent[..., r:], positions, c)  # [s, b, dr], one for all heads
    kv = lin("linear_kv_up_proj", c_kv).view(s, b, heads, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]

    scale = 1 / math.sqrt(dn + dr)
    if c.rope_type == "yarn" and c.mscale_all_dim:
        scale *= (0.1 * c.mscale_all_dim * math.log(c.rotary_scaling_factor) + 1) ** 2
    scores = (torch.einsum("qbhd,kbhd->bhqk", q_nope, k_nope)
              + torch.einsum("qbhd,kbd->bhqk", q_pe, k_pe)) * scale
    blocked = torch.ones(s, s, dtype=torch.bool).triu(1)
    if mask is not None:
        blocked = blocked | mask
    probs = scores.masked_fill(blocked, float("-inf")).softmax(-1)
    context = torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(s, b, heads * dv)
    return lin("linear_proj", context)


def run(layer: MultiLatentAttention, x: Tensor, **kwargs: Any) -> Tensor:
    out, bias = layer(x, **kwargs)
    return out if bias is None else out + bias


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("rope_type", ["rope", "yarn"])
def test_matches_reference(q_lora_rank: int | None, rope_type: str) -> None:
    config = make_config(q_lora_rank=q_lora_rank, rope_type=rope_type)
    layer = build_mla(config)
    x = torch.randn(7, 2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(run(layer, x), reference_mla(layer, x), **TOL)


def test_yarn_with_default_mscale_all_dim_and_biases() -> None:
    # mscale_all_dim=0: no softmax correction, cos/sin scaled by mscale(factor, mscale) alone.
    config = make_config(mscale=0.7, mscale_all_dim=0.0, rotary_scaling_factor=8.0,
                         add_qkv_bias=True, add_bias_linear=True)
    layer = build_mla(config)
    assert layer.softmax_scale == pytest.approx(1 / math.sqrt(24))
    assert layer.rotary.magnitude == pytest.approx(yarn_get_mscale(8.0, 0.7))
    x = torch.randn(6, 3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(run(layer, x), reference_mla(layer, x), **TOL)


def test_dot_product_core_and_padding_mask() -> None:
    config = make_config()
    layer = build_mla(config, core=DotProductAttention, mask_type=AttnMaskType.padding_causal)
    x = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(3))
    pad = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    pad[1, ..., 3:] = True  # the second sequence has 3 tokens
    with torch.no_grad():
        out = run(layer, x, attention_mask=pad)
        expected = reference_mla(layer, x, mask=pad)
    torch.testing.assert_close(out[:, 0], expected[:, 0], **TOL)
    torch.testing.assert_close(out[:3, 1], expected[:3, 1], **TOL)


def test_rotary_pos_emb_argument_is_ignored() -> None:
    layer = build_mla(make_config())
    x = torch.randn(4, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(run(layer, x, rotary_pos_emb=torch.randn(4, 1, 1, 8)),
                                   run(layer, x))


def test_backward_reaches_every_parameter() -> None:
    layer = build_mla(make_config()).train()
    run(layer, torch.randn(5, 2, 64)).square().sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


# ---------------------------------------------------------------- latent KV cache

def decode_in_steps(layer: MultiLatentAttention, x: Tensor, steps: list[int],
                    context: InferenceContext) -> Tensor:
    outputs = []
    start = 0
    for n in steps:
        outputs.append(run(layer, x[start:start + n], inference_context=context))
        context.increment(n)
        start += n
    return torch.cat(outputs)


@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("rope_type", ["rope", "yarn"])
@pytest.mark.parametrize("core", [SDPAttention, DotProductAttention])
def test_prefill_then_decode_equals_full_forward(q_lora_rank: int | None, rope_type: str,
                                                 core: CoreAttentionBuilder) -> None:
    config = make_config(q_lora_rank=q_lora_rank, rope_type=rope_type)
    layer = build_mla(config, core=core)
    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(4))
    context = InferenceContext(max_batch_size=3, max_sequence_length=12)
    with torch.no_grad():
        full = run(layer, x)
        stepped = decode_in_steps(layer, x, [4, 2, 1, 1], context)
    torch.testing.assert_close(stepped, full, **TOL)


def test_cache_holds_the_compressed_latent() -> None:
    config = make_config()
    layer = build_mla(config)
    x = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(5))
    context = InferenceContext(max_batch_size=3, max_sequence_length=9)
    with torch.no_grad():
        run(layer, x, inference_context=context)
    c_kv, k_pe = context.key_value_memory_dict[1]
    assert c_kv.shape == (9, 3, config.kv_lora_rank)
    assert k_pe.shape == (9, 3, config.qk_pos_emb_head_dim)
    # The normalized latent itself, and k_pe rotated for its position (halves layout).
    with torch.no_grad():
        latent = torch.einsum("sbi,oi->sbo", x, weight(layer, "linear_kv_down_proj"))
        expected_c = rms(latent[..., :32], weight(layer, "kv_layernorm"), 1e-6)
        rotated = rotate_pairs(latent[..., 32:], torch.arange(5), config)
        expected_pe = torch.cat((rotated[..., 0::2], rotated[..., 1::2]), dim=-1)
    torch.testing.assert_close(c_kv[:5, :2], expected_c, **TOL)
    torch.testing.assert_close(k_pe[:5, :2], expected_pe, **TOL)
    assert not c_kv[5:].any() and not c_kv[:, 2].any()  # untouched rows stay empty


def test_expanded_cache_when_latents_are_not_cached() -> None:
    config = make_config(cache_mla_latents=False)
    layer = build_mla(config)
    x = torch.randn(6, 2, 64, generator=torch.Generator().manual_seed(6))
    context = InferenceContext(max_batch_size=2, max_sequence_length=6)
    with torch.no_grad():
        full = run(layer, x)
        stepped = decode_in_steps(layer, x, [3, 1, 2], context)
    torch.testing.assert_close(stepped, full, **TOL)
    key, value = context.key_value_memory_dict[1]
    assert key.shape == (6, 2, 4, 16 + 8) and value.shape == (6, 2, 4, 12)


class _OpaqueColumnLinear(nn.Module):
    """A column-parallel linear that keeps its weight under another name (no `.weight`)."""

    def __init__(self, input_size: int, output_size: int, /, **kwargs: Any) -> None:
        super().__init__()
        self.inner = ColumnParallelLinear(input_size, output_size, **kwargs)

    def forward(self, input_: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return self.inner(input_)

    def backward_dw(self) -> None:
        self.inner.backward_dw()


def test_absorbed_decode_with_a_linear_without_weight_attribute() -> None:
    layer = build_mla(make_config(), linear_kv_up_proj=_OpaqueColumnLinear)
    assert not hasattr(layer.linear_kv_up_proj, "weight")
    x = torch.randn(5, 1, 64, generator=torch.Generator().manual_seed(7))
    context = InferenceContext(max_batch_size=1, max_sequence_length=5)
    with torch.no_grad():
        torch.testing.assert_close(decode_in_steps(layer, x, [3, 1, 1], context), run(layer, x),
                                   **TOL)


def test_cache_errors() -> None:
    layer = build_mla(make_config())
    with pytest.raises(ValueError, match="max_batch_size"):
        layer(torch.randn(2, 3, 64), inference_context=InferenceContext(2, 8))
    context = InferenceContext(max_batch_size=1, max_sequence_length=4)
    with pytest.raises(ValueError, match="max_sequence_length"):
        layer(torch.randn(5, 1, 64), inference_context=context)
    context.key_value_memory_dict[1] = (torch.zeros(4, 1, 7), torch.zeros(4, 1, 8))
    with pytest.raises(ValueError, match="layer_number"):
        layer(torch.randn(2, 1, 64), inference_context=context)


# ---------------------------------------------------------------- Hugging Face DeepseekV3Attention

os.environ.setdefault("HF_HUB_OFFLINE", "1")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="Hugging Face transformers is not installed")


def hf_attention(q_lora_rank: int | None, *, attention_bias: bool = False,
                 rope_interleave: bool = True) -> tuple[Any, Any]:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    config = DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        num_hidden_layers=1, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2, vocab_size=100,
        max_position_embeddings=4096 * 40, rms_norm_eps=1e-6, attention_bias=attention_bias,
        rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = hf.DeepseekV3Attention(config, layer_idx=0).eval()
    randomize(attention, seed=3)
    return attention, hf.DeepseekV3RotaryEmbedding(config)


def halves_to_pairs(w: Tensor, rope_dim: int, heads: int) -> Tensor:
    """Reorder the rotary rows of each head from rotate-half layout to interleaved pairs."""
    w = w.view(heads, -1, *w.shape[1:])
    rope = w[:, -rope_dim:]
    pairs = torch.stack((rope[:, : rope_dim // 2], rope[:, rope_dim // 2:]), dim=2)
    return torch.cat((w[:, :-rope_dim], pairs.flatten(1, 2)), dim=1).flatten(0, 1)


def load_hf_weights(layer: MultiLatentAttention, attention: Any, *, interleaved: bool) -> None:
    """Copy HF DeepseekV3Attention's weights into the layer (names differ, layouts agree).

    `kv_a_proj_with_mqa` is [c_kv rows | k_pe rows] like linear_kv_down_proj, `q_b_proj`/`q_proj`
    hold per head [nope | rope], `kv_b_proj` per head [k_nope | v]. Checkpoints made for
    `rope_interleave=False` keep the rotary rows in rotate-half order; they are re-paired here.
    """
    names = {"q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj",
             "q_a_layernorm": "q_layernorm", "q_b_proj": "linear_q_up_proj",
             "kv_a_proj_with_mqa": "linear_kv_down_proj", "kv_a_layernorm": "kv_layernorm",
             "kv_b_proj": "linear_kv_up_proj", "o_proj": "linear_proj"}
    ours = dict(layer.named_parameters())
    with torch.no_grad():
        for name, value in attention.named_parameters():
            module, kind = name.rsplit(".", 1)
            value = value.detach()
            if not interleaved and module in ("q_proj", "q_b_proj"):
                value = halves_to_pairs(value, 8, 4)
            if not interleaved and module == "kv_a_proj_with_mqa":
                value = halves_to_pairs(value, 8, 1)
            ours[f"{names[module]}.{kind}"].copy_(value)


@needs_transformers
@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize(("attention_bias", "rope_interleave"),
                         [(False, True), (True, True), (False, False)])
def test_matches_hugging_face_deepseek_v3(q_lora_rank: int | None, attention_bias: bool,
                                          rope_interleave: bool) -> None:
    attention, rotary = hf_attention(q_lora_rank, attention_bias=attention_bias,
                                     rope_interleave=rope_interleave)
    config = make_config(q_lora_rank=q_lora_rank, add_qkv_bias=attention_bias,
                         add_bias_linear=attention_bias)
    layer = build_mla(config)
    load_hf_weights(layer, attention, interleaved=rope_interleave)
    assert layer.softmax_scale == pytest.approx(attention.scaling)

    batch, seq = 2, 7
    x = torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(8))  # HF: [b, s, h]
    positions = torch.arange(seq).expand(batch, seq)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None]  # [1, 1, s, s]
    with torch.no_grad():
        expected, _ = attention(x, rotary(x, positions), mask)
        ours = run(layer, x.transpose(0, 1))  # ours: [s, b, h]
        context = InferenceContext(max_batch_size=batch, max_sequence_length=seq)
        stepped = decode_in_steps(layer, x.transpose(0, 1), [4, 1, 2], context)
    torch.testing.assert_close(ours.transpose(0, 1), expected, **TOL)
    torch.testing.assert_close(stepped.transpose(0, 1), expected, **TOL)


# ---------------------------------------------------------------- typed slots

def test_partial_is_an_attention_builder_and_builds_a_layer() -> None:
    config = make_config()
    spec = mla_layer_spec(get_backend("local"), config)
    check_builder(spec.self_attention, AttentionBuilder, slot="self_attention")
    layer = TransformerLayer(config, spec, layer_number=1).eval()
    assert isinstance(layer.self_attention, MultiLatentAttention)
    out = layer(torch.randn(4, 2, 64))
    assert out.shape == (4, 2, 64)


def test_recipe_fills_query_slots_per_config() -> None:
    backend = get_backend("local")
    compressed = mla_self_attention_spec(backend, make_config(q_lora_rank=24))
    assert compressed.linear_q_proj is None and compressed.linear_q_down_proj is Linear
    direct = mla_self_attention_spec(backend, make_config(q_lora_rank=None))
    assert direct.linear_q_proj is ColumnParallelLinear and direct.q_layernorm is None


@pytest.mark.parametrize(("q_lora_rank", "slot"), [
    (24, "linear_q_down_proj"), (24, "q_layernorm"), (24, "linear_q_up_proj"),
    (None, "linear_q_proj")])
def test_config_that_needs_an_empty_slot_is_a_spec_error(q_lora_rank: int | None,
                                                         slot: str) -> None:
    config = make_config(q_lora_rank=q_lora_rank)
    spec = dataclasses.replace(mla_self_attention_spec(get_backend("local"), config),
                               **{slot: None})
    with pytest.raises(SpecError, match=rf"MLASelfAttentionSubmodules\.{slot} is None but "
                                        rf"config\.q_lora_rank={q_lora_rank}"):
        MultiLatentAttention(config, spec, layer_number=1)


def _slots(**overrides: Any) -> dict[str, Any]:
    slots: dict[str, Any] = {
        "linear_q_down_proj": Linear, "linear_q_up_proj": ColumnParallelLinear,
        "q_layernorm": RMSNorm, "linear_kv_down_proj": Linear,
        "linear_kv_up_proj": ColumnParallelLinear, "kv_layernorm": RMSNorm,
        "core_attention": SDPAttention, "linear_proj": RowParallelLinear}
    slots.update(overrides)
    return slots


@pytest.mark.parametrize(("slot", "builder"), [
    ("linear_proj", ColumnParallelLinear),
    ("linear_kv_down_proj", RowParallelLinear),
    ("kv_layernorm", Linear),
    ("kv_layernorm", ColumnParallelLinear),
    ("linear_q_up_proj", RowParallelLinear),
])
def test_miswired_slot_is_a_spec_error(slot: str, builder: object) -> None:
    with pytest.raises(SpecError, match=rf"MLASelfAttentionSubmodules\.{slot}\b"):
        MLASelfAttentionSubmodules(**_slots(**{slot: builder}))


def test_correct_slots_are_accepted() -> None:
    MLASelfAttentionSubmodules(**_slots())
    check_builder(functools.partial(MultiLatentAttention,
                                    submodules=MLASelfAttentionSubmodules(**_slots())),
                  AttentionBuilder)


def test_non_mla_config_and_bad_arguments() -> None:
    spec = mla_self_attention_spec(get_backend("local"), make_config())
    plain = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    with pytest.raises(TypeError, match="MLATransformerConfig"):
        MultiLatentAttention(plain, spec, layer_number=1)
    with pytest.raises(TypeError, match="MLATransformerConfig"):
        mla_layer_spec(get_backend("local"), plain)
    with pytest.raises(ValueError, match="layer_number"):
        MultiLatentAttention(make_config(), spec, layer_number=0)
    layer = build_mla(make_config())
    with pytest.raises(ValueError, match="self-attention only"):
        layer(torch.randn(2, 1, 64), key_value_states=torch.randn(2, 1, 64))
    with pytest.raises(ValueError, match=r"\[sequence, batch, 64\]"):
        layer(torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="even"):
        make_config(qk_pos_emb_head_dim=7)


# ---------------------------------------------------------------- tensor parallelism

def _shard_like(full: Tensor, part: Tensor, rank: int, world_size: int) -> Tensor:
    """The slice of `full` a rank holds: whole if replicated, else its chunk of the split dim."""
    if full.shape == part.shape:
        return full
    (dim,) = [d for d in range(full.dim()) if full.shape[d] != part.shape[d]]
    return full.chunk(world_size, dim=dim)[rank]


def _check_tensor_parallel(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from protoformer.parallel.groups import ProcessGroups

    pg = ProcessGroups(tp=dist.group.WORLD)  # every rank in one tensor-parallel group
    config = make_config()
    full = build_mla(config, seed=0)  # the same weights on every rank
    spec = mla_self_attention_spec(get_backend("local"), config)
    part = MultiLatentAttention(config, spec, layer_number=1, pg=pg).eval()
    full_params = dict(full.named_parameters())
    with torch.no_grad():
        for name, param in part.named_parameters():
            param.copy_(_shard_like(full_params[name], param, rank, world_size))

    generator = torch.Generator().manual_seed(9)
    x = torch.randn(6, 2, 64, generator=generator)
    upstream = torch.randn(6, 2, 64, generator=generator)
    x_full, x_part = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_full, out_part = run(full, x_full), run(part, x_part)
    torch.testing.assert_close(out_part, out_full, **TOL)
    (out_full * upstream).sum().backward()
    (out_part * upstream).sum().backward()
    torch.testing.assert_close(x_part.grad, x_full.grad, **TOL)
    for name, param in part.named_parameters():  # replicated ones included (kv_down's rope rows)
        expected = _shard_like(full_params[name].grad, param, rank, world_size)
        torch.testing.assert_close(param.grad, expected, **TOL, msg=name)

    context = InferenceContext(max_batch_size=2, max_sequence_length=6)
    with torch.no_grad():
        stepped = decode_in_steps(part, x, [3, 2, 1], context)
    torch.testing.assert_close(stepped, out_full.detach(), **TOL)
    c_kv, _ = context.key_value_memory_dict[1]
    assert c_kv.shape == (6, 2, config.kv_lora_rank)  # the latent is not split over ranks


@pytest.mark.slow  # spawns two processes (gloo)
def test_tensor_parallel_matches_one_rank() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
    from dist_utils import run_distributed

    run_distributed(_check_tensor_parallel, 2)
