"""TransformerLayer / TransformerBlock against a naive pre-norm layer written here.

The reference un-fuses Megatron's grouped QKV rows, rotates with explicit cos/sin, computes
causal softmax attention with einsum and the MLP with explicit gate/up halves; it shares
nothing with the layer's code path but the weights.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.recipes import gpt_layer_spec, mlp_spec
from protoformer.spec import SpecError
from protoformer.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from protoformer.transformer.block import TransformerBlock
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    bias_dropout_add,
)
from protoformer.transformer.mlp import MLP
from protoformer.transformer.norm import LayerNorm, RMSNorm
from protoformer.transformer.rope import rotary_emb_from_config

TOL = {"atol": 2e-5, "rtol": 2e-5}


def make_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 40,
        "attention_dropout": 0.0, "hidden_dropout": 0.0,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


LLAMA_LIKE = {"normalization": "RMSNorm", "num_query_groups": 2, "gated_linear_unit": True,
              "activation_func": F.silu, "add_bias_linear": False}
GPT2_LIKE = {"normalization": "LayerNorm", "add_bias_linear": True, "add_qkv_bias": True,
             "activation_func": F.gelu}


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Scale-0.3 random parameters (norm weights and biases included), so every weight matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def build_layer(config: TransformerConfig, layer_number: int = 1) -> TransformerLayer:
    layer = TransformerLayer(config, gpt_layer_spec(get_backend("local"), config), layer_number)
    randomize(layer)
    return layer.eval()


# ---------------------------------------------------------------- the independent reference


def param(module: object, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return None if value is None else value.detach()


def naive_norm(x: Tensor, norm: object, config: TransformerConfig) -> Tensor:
    weight = param(norm, "weight")
    assert weight is not None
    eps = config.layernorm_epsilon
    if config.normalization == "RMSNorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    bias = param(norm, "bias")
    assert bias is not None
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def unfuse_grouped(fused: Tensor, heads: int, groups: int, hn: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split [for each group: its query heads, its key head, its value head] rows."""
    per_group = heads // groups
    blocks = fused.reshape(groups, per_group + 2, hn, *fused.shape[1:])
    q = blocks[:, :per_group].reshape(heads * hn, *fused.shape[1:])
    k = blocks[:, per_group].reshape(groups * hn, *fused.shape[1:])
    v = blocks[:, per_group + 1].reshape(groups * hn, *fused.shape[1:])
    return q, k, v


def rotate(x: Tensor, base: float) -> Tensor:
    """Non-interleaved RoPE of x [s, b, n, d] at positions 0..s-1, channel i paired with i + d/2."""
    s, d = x.shape[0], x.shape[-1]
    half = d // 2
    inv_freq = torch.tensor([base ** (-2 * i / d) for i in range(half)], dtype=torch.float64)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [s, half]
    cos = torch.cos(angles)[:, None, None, :].to(x.dtype)
    sin = torch.sin(angles)[:, None, None, :].to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def naive_self_attention(x: Tensor, layer: SelfAttention, config: TransformerConfig) -> Tensor:
    heads, groups, hn = config.num_attention_heads, config.query_groups, config.head_dim
    s, b, _ = x.shape
    weight = param(layer.linear_qkv, "weight")
    assert weight is not None
    wq, wk, wv = unfuse_grouped(weight, heads, groups, hn)
    q = torch.einsum("sbh,oh->sbo", x, wq)
    k = torch.einsum("sbh,oh->sbo", x, wk)
    v = torch.einsum("sbh,oh->sbo", x, wv)
    bias = param(layer.linear_qkv, "bias")
    if bias is not None:
        bq, bk, bv = unfuse_grouped(bias, heads, groups, hn)
        q, k, v = q + bq, k + bk, v + bv
    q = rotate(q.view(s, b, heads, hn), config.rotary_base)
    k = rotate(k.view(s, b, groups, hn), config.rotary_base)
    v = v.view(s, b, groups, hn)
    per_group = heads // groups
    k = k.repeat_interleave(per_group, dim=2)  # head i reads group i // per_group
    v = v.repeat_interleave(per_group, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(hn)
    future = torch.arange(s)[None, :] > torch.arange(s)[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    context = torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(s, b, heads * hn)
    wo = param(layer.linear_proj, "weight")
    assert wo is not None
    out = torch.einsum("sbi,oi->sbo", context, wo)
    bo = param(layer.linear_proj, "bias")
    return out if bo is None else out + bo


def naive_mlp(x: Tensor, mlp: MLP, config: TransformerConfig) -> Tensor:
    w1, w2 = param(mlp.linear_fc1, "weight"), param(mlp.linear_fc2, "weight")
    assert w1 is not None and w2 is not None
    h = torch.einsum("sbi,oi->sbo", x, w1)
    b1 = param(mlp.linear_fc1, "bias")
    if b1 is not None:
        h = h + b1
    if config.gated_linear_unit:
        gate, up = h.chunk(2, dim=-1)
        h = gate * torch.sigmoid(gate) * up  # SwiGLU
    else:
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GeLU
    out = torch.einsum("sbf,of->sbo", h, w2)
    b2 = param(mlp.linear_fc2, "bias")
    return out if b2 is None else out + b2


def naive_layer(x: Tensor, layer: TransformerLayer, config: TransformerConfig) -> Tensor:
    attention, mlp = layer.self_attention, layer.mlp
    assert isinstance(attention, SelfAttention) and isinstance(mlp, MLP)
    h = x + naive_self_attention(naive_norm(x, layer.input_layernorm, config), attention, config)
    return h + naive_mlp(naive_norm(h, layer.pre_mlp_layernorm, config), mlp, config)


# ---------------------------------------------------------------- TransformerLayer


@pytest.mark.parametrize("style", [LLAMA_LIKE, GPT2_LIKE], ids=["llama-like", "gpt2-like"])
def test_layer_matches_naive_pre_norm_layer(style: dict[str, object]) -> None:
    config = make_config(**style)
    layer = build_layer(config)
    x = torch.randn(6, 2, 32)
    rotary = rotary_emb_from_config(config)(6)  # [6, 1, 1, hn]
    out = layer(x, rotary_pos_emb=rotary)
    assert out.shape == x.shape
    torch.testing.assert_close(out, naive_layer(x, layer, config), **TOL)


def test_layer_builds_norms_of_the_config_kind_and_numbers_itself() -> None:
    layer = build_layer(make_config(**LLAMA_LIKE), layer_number=3)
    assert isinstance(layer.input_layernorm, RMSNorm)
    assert isinstance(layer.pre_mlp_layernorm, RMSNorm)
    assert layer.layer_number == 3
    assert isinstance(layer.self_attention, SelfAttention)
    assert layer.self_attention.layer_number == 3
    assert layer.cross_attention is None and layer.pre_cross_attn_layernorm is None


def test_hidden_dropout_applies_only_in_training() -> None:
    config = make_config(**LLAMA_LIKE, hidden_dropout=0.5)
    layer = build_layer(config)
    x = torch.randn(4, 2, 32)
    rotary = rotary_emb_from_config(config)(4)
    torch.testing.assert_close(layer(x, rotary_pos_emb=rotary), naive_layer(x, layer, config),
                               **TOL)
    layer.train()
    assert not torch.allclose(layer(x, rotary_pos_emb=rotary), naive_layer(x, layer, config))


def test_bias_dropout_add_is_residual_plus_dropped_sum() -> None:
    torch.manual_seed(0)
    x, bias, residual = torch.randn(64, 8), torch.randn(8), torch.randn(64, 8)
    torch.testing.assert_close(bias_dropout_add(x, bias, residual, prob=0.5, training=False),
                               residual + x + bias)
    torch.testing.assert_close(bias_dropout_add(x, None, residual, prob=0.0, training=True),
                               residual + x)
    out = bias_dropout_add(x, bias, residual, prob=0.5, training=True)
    kept = torch.isclose(out, residual + 2.0 * (x + bias))
    dropped = torch.isclose(out, residual)
    assert bool((kept | dropped).all())
    assert 0.3 < kept.float().mean().item() < 0.7


def test_full_recompute_gives_same_output_and_gradients_and_reruns_forward() -> None:
    plain_config = make_config(**LLAMA_LIKE, hidden_dropout=0.2, attention_dropout=0.2)
    recompute_config = make_config(**LLAMA_LIKE, hidden_dropout=0.2, attention_dropout=0.2,
                                   recompute_granularity="full")
    plain, recomputed = build_layer(plain_config).train(), build_layer(recompute_config).train()
    recomputed.load_state_dict(plain.state_dict())
    calls = {"mlp": 0}

    def count(*_: object) -> None:
        calls["mlp"] += 1

    recomputed.mlp.register_forward_hook(count)  # type: ignore[union-attr]
    x = torch.randn(5, 2, 32)
    rotary = rotary_emb_from_config(plain_config)(5)
    results = []
    for layer in (plain, recomputed):
        torch.manual_seed(7)
        inputs = x.clone().requires_grad_(True)
        out = layer(inputs, rotary_pos_emb=rotary)
        out.square().sum().backward()
        results.append((out.detach(), inputs.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert calls["mlp"] == 2  # once in forward, once again in backward
    (out_a, grad_a, params_a), (out_b, grad_b, params_b) = results
    torch.testing.assert_close(out_b, out_a, **TOL)
    torch.testing.assert_close(grad_b, grad_a, **TOL)
    for name, grad in params_a.items():
        torch.testing.assert_close(params_b[name], grad, **TOL)


def cross_layer_spec(config: TransformerConfig) -> TransformerLayerSubmodules:
    backend = get_backend("local")
    spec = gpt_layer_spec(backend, config)
    cross = CrossAttentionSubmodules(
        linear_q=backend.column_parallel_linear(), linear_kv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(), linear_proj=backend.row_parallel_linear())
    return TransformerLayerSubmodules(
        input_layernorm=spec.input_layernorm, self_attention=spec.self_attention,
        pre_cross_attn_layernorm=spec.input_layernorm,
        cross_attention=functools.partial(CrossAttention, submodules=cross,
                                          attn_mask_type=AttnMaskType.no_mask),
        pre_mlp_layernorm=spec.pre_mlp_layernorm, mlp=spec.mlp)


def test_cross_attention_layer_runs_three_residual_branches_in_order() -> None:
    config = make_config(**LLAMA_LIKE)
    layer = TransformerLayer(config, cross_layer_spec(config)).eval()
    randomize(layer)
    x, context = torch.randn(5, 2, 32), torch.randn(7, 2, 32)
    rotary = rotary_emb_from_config(config)(5)
    out = layer(x, context=context, rotary_pos_emb=rotary)

    assert isinstance(layer.cross_attention, CrossAttention)
    assert isinstance(layer.pre_cross_attn_layernorm, RMSNorm)
    h = x + sum_output(layer.self_attention(layer.input_layernorm(x), rotary_pos_emb=rotary))
    h = h + sum_output(layer.cross_attention(layer.pre_cross_attn_layernorm(h),
                                             key_value_states=context))
    h = h + sum_output(layer.mlp(layer.pre_mlp_layernorm(h)))
    torch.testing.assert_close(out, h, **TOL)
    # The memory matters: another context gives another output.
    assert not torch.allclose(layer(x, context=context + 1.0, rotary_pos_emb=rotary), out)


def test_parallel_residual_layer_adds_both_branches_of_the_input() -> None:
    config = make_config(**LLAMA_LIKE)
    layer = TransformerLayer(config, gpt_layer_spec(get_backend("local"), config,
                                                    parallel_residual=True)).eval()
    randomize(layer)
    x = torch.randn(5, 2, 32)
    rotary = rotary_emb_from_config(config)(5)
    attention = sum_output(layer.self_attention(layer.input_layernorm(x), rotary_pos_emb=rotary))
    mlp = sum_output(layer.mlp(layer.pre_mlp_layernorm(x)))
    torch.testing.assert_close(layer(x, rotary_pos_emb=rotary), x + attention + mlp, **TOL)


def test_submodules_check_the_parallel_residual_option() -> None:
    config = make_config(**LLAMA_LIKE)
    spec = gpt_layer_spec(get_backend("local"), config)
    with pytest.raises(TypeError, match="parallel_residual='yes': must be True or False"):
        TransformerLayerSubmodules(
            input_layernorm=spec.input_layernorm, self_attention=spec.self_attention,
            pre_mlp_layernorm=spec.pre_mlp_layernorm, mlp=spec.mlp,
            parallel_residual="yes")  # type: ignore[arg-type]
    cross = cross_layer_spec(config)
    with pytest.raises(ValueError, match=r"parallel_residual=True .* cross_attention"):
        TransformerLayerSubmodules(
            input_layernorm=cross.input_layernorm, self_attention=cross.self_attention,
            pre_cross_attn_layernorm=cross.pre_cross_attn_layernorm,
            cross_attention=cross.cross_attention, pre_mlp_layernorm=cross.pre_mlp_layernorm,
            mlp=cross.mlp, parallel_residual=True)


def sum_output(result: tuple[Tensor, Tensor | None]) -> Tensor:
    out, bias = result
    return out if bias is None else out + bias


def test_layer_rejects_context_without_cross_attention() -> None:
    layer = build_layer(make_config(**LLAMA_LIKE))
    with pytest.raises(ValueError, match="no cross_attention"):
        layer(torch.randn(3, 1, 32), context=torch.randn(3, 1, 32))


def test_layer_rejects_wrong_hidden_states_shape() -> None:
    layer = build_layer(make_config(**LLAMA_LIKE))
    with pytest.raises(ValueError, match=r"\[s, b, 32\]"):
        layer(torch.randn(3, 16))


def test_layer_rejects_bad_layer_number_and_submodules() -> None:
    config = make_config(**LLAMA_LIKE)
    spec = gpt_layer_spec(get_backend("local"), config)
    with pytest.raises(ValueError, match="layer_number=0"):
        TransformerLayer(config, spec, layer_number=0)
    with pytest.raises(TypeError, match="TransformerLayerSubmodules"):
        TransformerLayer(config, object())  # type: ignore[arg-type]


def test_submodules_reject_cross_norm_without_cross_attention() -> None:
    config = make_config(**LLAMA_LIKE)
    spec = gpt_layer_spec(get_backend("local"), config)
    with pytest.raises(ValueError, match="pre_cross_attn_layernorm is set"):
        TransformerLayerSubmodules(
            input_layernorm=spec.input_layernorm, self_attention=spec.self_attention,
            pre_mlp_layernorm=spec.pre_mlp_layernorm, mlp=spec.mlp,
            pre_cross_attn_layernorm=spec.input_layernorm)


def test_submodules_reject_swapped_attention_and_mlp_builders() -> None:
    config = make_config(**LLAMA_LIKE)
    backend = get_backend("local")
    attention = functools.partial(SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear, core_attention=backend.core_attention(),
        linear_proj=RowParallelLinear))
    mlp = functools.partial(MLP, submodules=mlp_spec(backend, config))
    norm = backend.layer_norm(rms_norm=True)
    with pytest.raises(SpecError, match=r"(?s)TransformerLayerSubmodules\.self_attention.*layer_number"):
        TransformerLayerSubmodules(input_layernorm=norm, self_attention=mlp,  # type: ignore[arg-type]
                                   pre_mlp_layernorm=norm, mlp=mlp)
    with pytest.raises(SpecError, match=r"(?s)TransformerLayerSubmodules\.mlp.*layer_number"):
        TransformerLayerSubmodules(input_layernorm=norm, self_attention=attention,
                                   pre_mlp_layernorm=norm, mlp=attention)


# ---------------------------------------------------------------- TransformerBlock


def test_block_stacks_numbered_layers_then_final_norm() -> None:
    config = make_config(**GPT2_LIKE, num_layers=3)
    block = TransformerBlock(config, gpt_layer_spec(get_backend("local"), config)).eval()
    randomize(block)
    assert [layer.layer_number for layer in block.layers] == [1, 2, 3]  # type: ignore[union-attr]
    assert isinstance(block.final_layernorm, LayerNorm)
    x = torch.randn(4, 2, 32)
    rotary = rotary_emb_from_config(config)(4)
    expected = x
    for layer in block.layers:
        assert isinstance(layer, TransformerLayer)
        expected = naive_layer(expected, layer, config)
    expected = naive_norm(expected, block.final_layernorm, config)
    torch.testing.assert_close(block(x, rotary_pos_emb=rotary), expected, **TOL)


def test_block_without_post_layer_norm_has_no_final_norm() -> None:
    config = make_config(**LLAMA_LIKE, num_layers=1)
    block = TransformerBlock(config, gpt_layer_spec(get_backend("local"), config),
                             post_layer_norm=False).eval()
    assert block.final_layernorm is None
    x = torch.randn(3, 1, 32)
    rotary = rotary_emb_from_config(config)(3)
    layer = block.layers[0]
    assert isinstance(layer, TransformerLayer)
    torch.testing.assert_close(block(x, rotary_pos_emb=rotary), layer(x, rotary_pos_emb=rotary))


def test_transformer_layer_satisfies_its_builder_protocol() -> None:
    from protoformer.spec import check_builder
    from protoformer.transformer.layer import TransformerLayerBuilder

    check_builder(TransformerLayer, TransformerLayerBuilder)
