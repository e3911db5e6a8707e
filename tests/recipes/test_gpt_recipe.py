"""gpt_layer_spec / mlp_spec: which builders fill which slot, per config."""

from __future__ import annotations

import functools

import torch.nn.functional as F

from protoformer import TransformerConfig
from protoformer.backends import LocalSpecProvider, get_backend
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.recipes import gpt_layer_spec, mlp_spec
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayer, TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP, Activation, MLPSubmodules
from protoformer.transformer.norm import LayerNorm, RMSNorm


def config_of(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def test_mlp_spec_uses_the_backend_linears_and_activation() -> None:
    spec = mlp_spec(LocalSpecProvider(), config_of())
    assert spec == MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear,
                                 activation=Activation)


def test_gpt_layer_spec_wires_attention_and_mlp_partials() -> None:
    spec = gpt_layer_spec(get_backend("local"), config_of())
    assert isinstance(spec, TransformerLayerSubmodules)
    assert spec.input_layernorm is LayerNorm and spec.pre_mlp_layernorm is LayerNorm
    assert spec.cross_attention is None and spec.pre_cross_attn_layernorm is None
    attention = spec.self_attention
    assert isinstance(attention, functools.partial) and attention.func is SelfAttention
    assert attention.keywords["attn_mask_type"] is AttnMaskType.padding_causal
    submodules = attention.keywords["submodules"]
    assert isinstance(submodules, SelfAttentionSubmodules)
    assert submodules.linear_qkv is ColumnParallelLinear
    assert submodules.linear_proj is RowParallelLinear
    assert submodules.q_layernorm is None and submodules.k_layernorm is None
    mlp = spec.mlp
    assert isinstance(mlp, functools.partial) and mlp.func is MLP
    assert mlp.keywords["submodules"] == mlp_spec(get_backend("local"), config_of())


def test_gpt_layer_spec_follows_normalization_and_qk_layernorm() -> None:
    spec = gpt_layer_spec(get_backend("local"),
                          config_of(normalization="RMSNorm", qk_layernorm=True))
    assert spec.input_layernorm is RMSNorm and spec.pre_mlp_layernorm is RMSNorm
    attention = spec.self_attention
    assert isinstance(attention, functools.partial)
    submodules = attention.keywords["submodules"]
    assert submodules.q_layernorm is RMSNorm and submodules.k_layernorm is RMSNorm


def test_gpt_layer_spec_builds_a_gated_layer() -> None:
    config = config_of(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                       ffn_hidden_size=40, qk_layernorm=True)
    layer = TransformerLayer(config, gpt_layer_spec(get_backend("local"), config))
    assert isinstance(layer.mlp, MLP)
    fc1 = layer.mlp.linear_fc1
    assert isinstance(fc1, ColumnParallelLinear) and fc1.weight is not None
    assert tuple(fc1.weight.shape) == (80, 32)
    assert isinstance(layer.self_attention, SelfAttention)
    assert isinstance(layer.self_attention.q_layernorm, RMSNorm)
