"""SelfAttention / CrossAttention against a naive reference written here, with the layer's own weights.

The reference un-fuses Megatron's grouped QKV layout with its own loop, computes per-head
softmax attention with einsum, rotates with explicit cos/sin and normalizes q/k with an
explicit RMSNorm; it shares nothing with the layer's code path but the weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.spec import check_builder
from protoformer.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.inference import InferenceContext
from protoformer.transformer.interfaces import AttentionBuilder, CoreAttentionBuilder
from protoformer.transformer.rope import rotary_emb_from_config

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "add_bias_linear": False,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Scale-0.3 random parameters (norm weights and biases included), so every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def self_attention(config: TransformerConfig, *, qk_norm: bool = False,
                   mask_type: AttnMaskType = AttnMaskType.causal,
                   core: CoreAttentionBuilder = SDPAttention, seed: int = 0) -> SelfAttention:
    backend = get_backend("local")
    norm = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else None
    submodules = SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(), core_attention=core,
        linear_proj=backend.row_parallel_linear(), q_layernorm=norm, k_layernorm=norm)
    layer = SelfAttention(config, submodules, layer_number=1, attn_mask_type=mask_type).eval()
    randomize(layer, seed)
    return layer


def cross_attention(config: TransformerConfig, *, mask_type: AttnMaskType = AttnMaskType.no_mask,
                    qk_norm: bool = False) -> CrossAttention:
    backend = get_backend("local")
    norm = backend.layer_norm(rms_norm=True, for_qk=True) if qk_norm else None
    submodules = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(), linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear(),
        q_layernorm=norm, k_layernorm=norm)
    layer = CrossAttention(config, submodules, layer_number=1, attn_mask_type=mask_type).eval()
    randomize(layer)
    return layer


# ---------------------------------------------------------------- the independent reference


@dataclass
class Weights:
    wq: Tensor  # [np * hn, h]
    wk: Tensor  # [ng * hn, h]
    wv: Tensor  # [ng * hn, h]
    bq: Tensor | None
    bk: Tensor | None
    bv: Tensor | None
    wo: Tensor  # [h, np * hn]
    bo: Tensor | None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None


def unfuse_grouped(fused: Tensor, heads: int, groups: int, hn: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split Megatron's [ng x (q heads of the group, k, v)] rows into (q rows, k rows, v rows)."""
    per_group = heads // groups
    q_rows, k_rows, v_rows = [], [], []
    row = 0
    for _group in range(groups):
        for _head in range(per_group):
            q_rows.append(fused[row:row + hn])
            row += hn
        k_rows.append(fused[row:row + hn])
        row += hn
        v_rows.append(fused[row:row + hn])
        row += hn
    assert row == fused.shape[0]
    return torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows)


def weights_of(layer: SelfAttention, config: TransformerConfig) -> Weights:
    heads, groups, hn = config.num_attention_heads, config.query_groups, config.head_dim
    qkv = layer.linear_qkv
    wq, wk, wv = unfuse_grouped(qkv.weight.detach(), heads, groups, hn)  # type: ignore[union-attr, operator]
    bq = bk = bv = None
    if getattr(qkv, "bias", None) is not None:
        bq, bk, bv = unfuse_grouped(qkv.bias.detach(), heads, groups, hn)  # type: ignore[union-attr, operator]
    proj = layer.linear_proj
    bo = proj.bias.detach() if getattr(proj, "bias", None) is not None else None  # type: ignore[union-attr, operator]
    return Weights(wq, wk, wv, bq, bk, bv, proj.weight.detach(), bo,  # type: ignore[union-attr, operator, arg-type]
                   _norm_weight(layer.q_layernorm), _norm_weight(layer.k_layernorm))


def _norm_weight(norm: object) -> Tensor | None:
    return None if norm is None else norm.weight.detach()  # type: ignore[attr-defined]


def inv_freq_plain(rot_dim: int, base: float) -> Tensor:
    return torch.tensor([base ** (-(2 * i) / rot_dim) for i in range(rot_dim // 2)], dtype=torch.float64)


def inv_freq_llama3(rot_dim: int, base: float, factor: float, low: float, high: float,
                    original: int) -> Tensor:
    out = []
    for freq in inv_freq_plain(rot_dim, base).tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            out.append(freq)
        elif wavelength > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def rotate(x: Tensor, positions: Tensor, inv_freq: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate channel pairs of x [s, b, n, d] by angle position * inv_freq[i]; the rest passes."""
    half = inv_freq.shape[0]
    angles = positions.double()[:, None] * inv_freq[None, :]  # [s, half]
    cos = torch.cos(angles)[:, None, None, :].to(x.dtype)  # [s, 1, 1, half]
    sin = torch.sin(angles)[:, None, None, :].to(x.dtype)
    out = x.clone()
    if interleaved:
        first, second = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = first * cos - second * sin
        out[..., 1:2 * half:2] = second * cos + first * sin
    else:
        first, second = x[..., :half], x[..., half:2 * half]
        out[..., :half] = first * cos - second * sin
        out[..., half:2 * half] = second * cos + first * sin
    return out


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def reference(
    x: Tensor, memory: Tensor | None, w: Weights, config: TransformerConfig, *,
    causal: bool, mask: Tensor | None = None, inv_freq: Tensor | None = None,
    interleaved: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Naive attention. `mask`: bool [b, 1|np, sq, sk] True = blocked, or float added."""
    heads, groups, hn = config.num_attention_heads, config.query_groups, config.head_dim
    kv_input = x if memory is None else memory
    sq, batch = x.shape[0], x.shape[1]
    sk = kv_input.shape[0]

    def project(inp: Tensor, weight: Tensor, bias: Tensor | None, n: int) -> Tensor:
        out = torch.einsum("sbh,oh->sbo", inp, weight)
        if bias is not None:
            out = out + bias
        return out.reshape(inp.shape[0], batch, n, hn)

    q = project(x, w.wq, w.bq, heads)  # [sq, b, np, hn]
    k = project(kv_input, w.wk, w.bk, groups)  # [sk, b, ng, hn]
    v = project(kv_input, w.wv, w.bv, groups)
    eps = config.layernorm_epsilon
    if w.q_norm is not None:
        q = rms(q, w.q_norm, eps)
    if w.k_norm is not None:
        k = rms(k, w.k_norm, eps)
    if inv_freq is not None:
        q = rotate(q, torch.arange(sq), inv_freq, interleaved=interleaved)
        k = rotate(k, torch.arange(sk), inv_freq, interleaved=interleaved)
    group_of_head = torch.tensor([n // (heads // groups) for n in range(heads)])
    k = k[:, :, group_of_head]  # [sk, b, np, hn]
    v = v[:, :, group_of_head]
    scale = config.softmax_scale or 1.0 / math.sqrt(hn)
    scores = torch.einsum("ibnd,jbnd->bnij", q, k) * scale  # [b, np, sq, sk]
    if causal:
        future = torch.ones(sq, sk, dtype=torch.bool).triu(1 + sk - sq)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1)
    context = torch.einsum("bnij,jbnd->ibnd", probs, v).reshape(sq, batch, heads * hn)
    out = torch.einsum("sbi,hi->sbh", context, w.wo)
    return out, w.bo


def rope_table(config: TransformerConfig, length: int) -> Tensor:
    return rotary_emb_from_config(config)(length)  # [length, 1, 1, rot_dim]


def close(actual: tuple[Tensor, Tensor | None], expected: tuple[Tensor, Tensor | None]) -> None:
    torch.testing.assert_close(actual[0], expected[0], **TOL)
    if expected[1] is None:
        assert actual[1] is None
    else:
        assert actual[1] is not None
        torch.testing.assert_close(actual[1], expected[1], **TOL)


def inputs(config: TransformerConfig, s: int = 6, b: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(s, b, config.hidden_size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- self-attention numerics


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_self_attention_matches_reference(heads: int, groups: int) -> None:
    config = make_config(num_attention_heads=heads, num_query_groups=groups)
    layer = self_attention(config)
    x = inputs(config)
    close(layer(x), reference(x, None, weights_of(layer, config), config, causal=True))


def test_kv_channels_differ_from_hidden_over_heads() -> None:
    config = make_config(num_attention_heads=4, num_query_groups=2, kv_channels=12)
    layer = self_attention(config)
    assert layer.linear_qkv.weight.shape == (2 * (2 + 2) * 12, 32)  # type: ignore[union-attr]
    x = inputs(config)
    close(layer(x), reference(x, None, weights_of(layer, config), config, causal=True))


def test_qk_layernorm_is_per_head_rms_norm() -> None:
    config = make_config(num_query_groups=2, normalization="RMSNorm", qk_layernorm=True)
    layer = self_attention(config, qk_norm=True)
    assert layer.q_layernorm is not None and layer.q_layernorm.weight.shape == (8,)  # type: ignore[attr-defined]
    x = inputs(config)
    close(layer(x), reference(x, None, weights_of(layer, config), config, causal=True))


@pytest.mark.parametrize("percent", [1.0, 0.5])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_full_and_partial(percent: float, interleaved: bool) -> None:
    config = make_config(num_query_groups=2, rotary_percent=percent, rotary_interleaved=interleaved,
                         rotary_base=100.0)
    layer = self_attention(config)
    x = inputs(config)
    rot_dim = int(config.head_dim * percent)
    expected = reference(x, None, weights_of(layer, config), config, causal=True,
                         inv_freq=inv_freq_plain(rot_dim, 100.0), interleaved=interleaved)
    close(layer(x, rotary_pos_emb=rope_table(config, 10)), expected)


def test_llama3_scaled_rotary() -> None:
    config = make_config(num_query_groups=2, rope_scaling="llama3", rope_scaling_factor=8.0,
                         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                         rope_original_max_position_embeddings=64)
    layer = self_attention(config)
    x = inputs(config)
    inv_freq = inv_freq_llama3(8, 10000.0, 8.0, 1.0, 4.0, 64)
    assert not torch.allclose(inv_freq, inv_freq_plain(8, 10000.0))  # the scaling matters here
    expected = reference(x, None, weights_of(layer, config), config, causal=True, inv_freq=inv_freq)
    close(layer(x, rotary_pos_emb=rope_table(config, 6)), expected)


def padding(lengths: list[int], sk: int) -> Tensor:
    return torch.stack([torch.arange(sk) >= n for n in lengths])[:, None, None, :]  # [b, 1, 1, sk]


@pytest.mark.parametrize(("mask_type", "causal"), [(AttnMaskType.padding, False),
                                                   (AttnMaskType.padding_causal, True)])
def test_padding_mask(mask_type: AttnMaskType, causal: bool) -> None:
    config = make_config(num_query_groups=2)
    layer = self_attention(config, mask_type=mask_type)
    x = inputs(config)
    mask = padding([6, 4], 6)
    expected = reference(x, None, weights_of(layer, config), config, causal=causal, mask=mask)
    close(layer(x, mask), expected)


def test_additive_mask() -> None:
    config = make_config(num_query_groups=2)
    layer = self_attention(config, mask_type=AttnMaskType.arbitrary)
    x = inputs(config)
    mask = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    expected = reference(x, None, weights_of(layer, config), config, causal=False, mask=mask)
    close(layer(x, mask), expected)


@pytest.mark.parametrize(("qkv_bias", "linear_bias"), [(True, False), (False, True)])
def test_biases(qkv_bias: bool, linear_bias: bool) -> None:
    config = make_config(num_query_groups=2, add_qkv_bias=qkv_bias, add_bias_linear=linear_bias)
    layer = self_attention(config)
    weights = weights_of(layer, config)
    assert weights.bq is not None
    assert (weights.bo is not None) == linear_bias
    x = inputs(config)
    out, bias = layer(x)
    close((out, bias), reference(x, None, weights, config, causal=True))


def test_sdpa_and_dot_product_cores_agree() -> None:
    config = make_config(num_query_groups=2, qk_layernorm=True)
    sdpa = self_attention(config, qk_norm=True, core=SDPAttention, mask_type=AttnMaskType.padding_causal)
    plain = self_attention(config, qk_norm=True, core=DotProductAttention,
                           mask_type=AttnMaskType.padding_causal, seed=5)
    plain.load_state_dict(sdpa.state_dict())
    x = inputs(config)
    mask = padding([6, 5], 6)
    table = rope_table(config, 6)
    close(plain(x, mask, rotary_pos_emb=table), sdpa(x, mask, rotary_pos_emb=table))


# ---------------------------------------------------------------- cross-attention


@pytest.mark.parametrize("groups", [4, 2])
def test_cross_attention_with_longer_memory(groups: int) -> None:
    config = make_config(num_query_groups=groups)
    layer = cross_attention(config, mask_type=AttnMaskType.padding)
    x, memory = inputs(config, s=5), inputs(config, s=7, seed=2)
    qkv = layer.linear_q.weight.detach()  # type: ignore[union-attr]
    kv = layer.linear_kv.weight.detach()  # type: ignore[union-attr]
    hn = config.head_dim
    k_rows = torch.cat([kv[(2 * g) * hn:(2 * g + 1) * hn] for g in range(groups)])
    v_rows = torch.cat([kv[(2 * g + 1) * hn:(2 * g + 2) * hn] for g in range(groups)])
    weights = Weights(qkv, k_rows, v_rows, None, None, None,
                      layer.linear_proj.weight.detach(), None)  # type: ignore[union-attr, arg-type]
    mask = padding([7, 3], 7)
    expected = reference(x, memory, weights, config, causal=False, mask=mask)
    close(layer(x, mask, key_value_states=memory), expected)


def test_cross_attention_caches_the_projected_memory() -> None:
    config = make_config(num_query_groups=2, qk_layernorm=True)
    layer = cross_attention(config, qk_norm=True)
    x, memory = inputs(config, s=4), inputs(config, s=7, seed=2)
    full, _ = layer(x, key_value_states=memory)
    context = InferenceContext(max_batch_size=2, max_sequence_length=8)
    first, _ = layer(x[:2], key_value_states=memory, inference_context=context)
    context.increment(2)
    rest, _ = layer(x[2:], inference_context=context)  # memory comes from the cache
    torch.testing.assert_close(torch.cat([first, rest]), full, **TOL)
    assert -1 in context.key_value_memory_dict


# ---------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("core", [SDPAttention, DotProductAttention])
def test_prefill_then_decode_equals_full_forward(core: CoreAttentionBuilder) -> None:
    config = make_config(num_query_groups=2, qk_layernorm=True, rotary_percent=0.5)
    layer = self_attention(config, qk_norm=True, core=core)
    x = inputs(config, s=11)
    table = rope_table(config, 16)
    with torch.no_grad():
        full, _ = layer(x, rotary_pos_emb=table)
        context = InferenceContext(max_batch_size=2, max_sequence_length=16)
        steps = [layer(x[:5], rotary_pos_emb=table, inference_context=context)[0]]
        context.increment(5)
        for position in range(5, 11):
            steps.append(layer(x[position:position + 1], rotary_pos_emb=table,
                               inference_context=context)[0])
            context.increment(1)
    torch.testing.assert_close(torch.cat(steps), full, **TOL)
    key_cache, value_cache = context.key_value_memory_dict[1]
    assert key_cache.shape == value_cache.shape == (16, 2, 2, 8)  # [max_s, max_b, ng, hn]


def test_decode_with_smaller_batch_than_the_cache() -> None:
    config = make_config(num_query_groups=1)
    layer = self_attention(config)
    x = inputs(config, s=4, b=1)
    with torch.no_grad():
        full, _ = layer(x)
        context = InferenceContext(max_batch_size=3, max_sequence_length=4)
        first, _ = layer(x[:3], inference_context=context)
        context.increment(3)
        last, _ = layer(x[3:], inference_context=context)
    torch.testing.assert_close(torch.cat([first, last]), full, **TOL)


# ---------------------------------------------------------------- builders and errors


def test_partial_self_and_cross_attention_are_attention_builders() -> None:
    config = make_config()
    backend = get_backend("local")
    self_builder = functools.partial(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(), core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear()))
    cross_builder = functools.partial(CrossAttention, submodules=CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(), linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear()))
    for builder in (self_builder, cross_builder):
        check_builder(builder, AttentionBuilder, slot="self_attention")
        layer = builder(config, layer_number=2, pg=None)
        assert layer.layer_number == 2


def test_wrong_hidden_size_is_a_value_error() -> None:
    layer = self_attention(make_config())
    with pytest.raises(ValueError, match=r"\(5, 2, 16\).*expected \[sequence, batch, 32\].*given last dimension 16"):
        layer(torch.randn(5, 2, 16))


def test_mask_that_cannot_broadcast_is_a_value_error() -> None:
    layer = self_attention(make_config(), mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="does not broadcast"):
        layer(torch.randn(5, 2, 32), torch.zeros(2, 1, 5, 4, dtype=torch.bool))


def test_sequence_longer_than_rope_table_is_a_value_error() -> None:
    config = make_config()
    layer = self_attention(config)
    with pytest.raises(ValueError, match="build the rotary table with max_seq_len >= 6"):
        layer(torch.randn(6, 2, 32), rotary_pos_emb=rope_table(config, 4))
    context = InferenceContext(max_batch_size=2, max_sequence_length=16, sequence_len_offset=3)
    with pytest.raises(ValueError, match="max_seq_len >= 7"):
        layer(torch.randn(4, 2, 32), rotary_pos_emb=rope_table(config, 6), inference_context=context)


def test_full_cache_is_a_value_error() -> None:
    layer = self_attention(make_config())
    context = InferenceContext(max_batch_size=2, max_sequence_length=4)
    with torch.no_grad():
        layer(torch.randn(3, 2, 32), inference_context=context)
        context.increment(3)
        with pytest.raises(ValueError, match="max_sequence_length=4"):
            layer(torch.randn(2, 2, 32), inference_context=context)
        big_batch = InferenceContext(max_batch_size=1, max_sequence_length=4)
        with pytest.raises(ValueError, match="max_batch_size=1"):
            layer(torch.randn(1, 2, 32), inference_context=big_batch)


def test_misuse_of_key_value_states_and_rope() -> None:
    config = make_config()
    with pytest.raises(ValueError, match="use CrossAttention"):
        self_attention(config)(torch.randn(2, 1, 32), key_value_states=torch.randn(3, 1, 32))
    cross = cross_attention(config)
    with pytest.raises(ValueError, match="needs key_value_states"):
        cross(torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="no rotary embedding"):
        cross(torch.randn(2, 1, 32), key_value_states=torch.randn(3, 1, 32),
              rotary_pos_emb=rope_table(config, 4))
    with pytest.raises(ValueError, match="key_value_states has shape"):
        cross(torch.randn(2, 1, 32), key_value_states=torch.randn(3, 1, 16))


def test_bad_construction_arguments() -> None:
    config = make_config()
    backend = get_backend("local")
    submodules = SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(), core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear())
    with pytest.raises(ValueError, match="numbered from 1"):
        SelfAttention(config, submodules, layer_number=0)
    wrong = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(), linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear())
    with pytest.raises(TypeError, match="SelfAttentionSubmodules"):
        SelfAttention(config, wrong, layer_number=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- tensor parallelism (gloo, CPU)


def _shard_fused_rows(fused: Tensor, rank: int, tp: int, heads: int, groups: int, hn: int) -> Tensor:
    """This rank's rows of a tp=1 fused QKV tensor: whole groups, or (ng < tp) a replicated group."""
    if groups >= tp:
        rows = fused.shape[0] // tp
        return fused[rank * rows:(rank + 1) * rows]
    wq, wk, wv = unfuse_grouped(fused, heads, groups, hn)
    heads_per_rank, group = heads // tp, rank // (tp // groups)
    q_rows = wq[rank * heads_per_rank * hn:(rank + 1) * heads_per_rank * hn]
    return torch.cat([q_rows, wk[group * hn:(group + 1) * hn], wv[group * hn:(group + 1) * hn]])


def _tensor_parallel_worker(rank: int, tp: int) -> None:
    import torch.distributed as dist

    from protoformer.parallel import ProcessGroups

    for heads, groups in ((4, 2), (4, 1)):  # whole groups per rank; one replicated group
        config = make_config(num_attention_heads=heads, num_query_groups=groups,
                             add_qkv_bias=True, add_bias_linear=True)
        hn = config.head_dim
        full = self_attention(config, qk_norm=True)
        torch.manual_seed(rank)
        backend = get_backend("local")
        norm = backend.layer_norm(rms_norm=True, for_qk=True)
        split = SelfAttention(config, SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(), core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(), q_layernorm=norm, k_layernorm=norm),
            layer_number=1, pg=ProcessGroups(tp=dist.group.WORLD))
        cols = heads * hn // tp
        with torch.no_grad():
            for name in ("weight", "bias"):
                getattr(split.linear_qkv, name).copy_(_shard_fused_rows(
                    getattr(full.linear_qkv, name), rank, tp, heads, groups, hn))
            split.linear_proj.weight.copy_(full.linear_proj.weight[:, rank * cols:(rank + 1) * cols])
            split.linear_proj.bias.copy_(full.linear_proj.bias)
            split.q_layernorm.weight.copy_(full.q_layernorm.weight)
            split.k_layernorm.weight.copy_(full.k_layernorm.weight)
        x = inputs(config)
        table = rope_table(config, 6)
        x_full, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_full, _ = full(x_full, rotary_pos_emb=table)
        out_split, _ = split(x_split, rotary_pos_emb=table)
        torch.testing.assert_close(out_split, out_full, **TOL)
        out_full.square().sum().backward()
        out_split.square().sum().backward()
        torch.testing.assert_close(x_split.grad, x_full.grad, **TOL)
        # A replicated key/value head gets the gradient of all the ranks that use it.
        expected = _shard_fused_rows(full.linear_qkv.weight.grad, rank, tp, heads, groups, hn)
        torch.testing.assert_close(split.linear_qkv.weight.grad, expected, **TOL)


@pytest.mark.slow  # spawns two processes (gloo)
def test_tensor_parallel_matches_single_process() -> None:
    import torch.distributed as dist

    from tests.parallel.dist_utils import run_distributed

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    run_distributed(_tensor_parallel_worker, 2)
