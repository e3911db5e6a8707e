"""TransformerConfig / MLATransformerConfig: derived defaults and validation."""

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protoformer import MLATransformerConfig, TransformerConfig

BASE: dict[str, Any] = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8}

# ---------------------------------------------------------------------------------------------
# Derived defaults.


def test_defaults_are_derived() -> None:
    config = TransformerConfig(**BASE)
    assert config.num_query_groups == 8  # plain multi-head attention
    assert config.kv_channels == 64 // 8
    assert config.ffn_hidden_size == 4 * 64
    assert config.head_dim == 8 and config.query_groups == 8 and config.ffn_size == 256


def test_given_sizes_are_kept() -> None:
    config = TransformerConfig(**BASE, num_query_groups=2, kv_channels=16, ffn_hidden_size=100)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (2, 16, 100)


def test_kv_channels_given_allows_indivisible_hidden_size() -> None:
    config = TransformerConfig(num_layers=1, hidden_size=10, num_attention_heads=4, kv_channels=3)
    assert config.kv_channels == 3


def test_mla_defaults() -> None:
    config = MLATransformerConfig(**BASE)
    assert config.normalization == "RMSNorm"
    assert config.num_query_groups == config.num_attention_heads
    assert config.q_head_dim == config.qk_head_dim + config.qk_pos_emb_head_dim == 128 + 64
    assert config.q_lora_rank == 512
    assert MLATransformerConfig(**BASE, q_lora_rank=None).q_lora_rank is None


# ---------------------------------------------------------------------------------------------
# Each validation rule: a ValueError naming the field, the value and the rule.

INVALID: list[tuple[dict[str, Any], str, str]] = [
    # (overrides, "field=repr(value)", rule fragment)
    ({"num_layers": 0}, "num_layers=0", "must be >= 1"),
    ({"num_layers": -3}, "num_layers=-3", "must be >= 1"),
    ({"num_layers": 2.0}, "num_layers=2.0", "must be an int"),
    ({"num_layers": True}, "num_layers=True", "must be an int"),
    ({"num_layers": "2"}, "num_layers='2'", "must be an int"),
    ({"hidden_size": 0}, "hidden_size=0", "must be >= 1"),
    ({"num_attention_heads": 0}, "num_attention_heads=0", "must be >= 1"),
    ({"num_attention_heads": None}, "num_attention_heads=None", "must be an int"),
    ({"num_query_groups": 0}, "num_query_groups=0", "must be >= 1"),
    ({"num_query_groups": 3}, "num_query_groups=3", "must divide num_attention_heads=8"),
    ({"num_query_groups": 16}, "num_query_groups=16", "must divide num_attention_heads=8"),
    ({"hidden_size": 60}, "hidden_size=60", "divisible by num_attention_heads=8"),
    ({"kv_channels": 0}, "kv_channels=0", "must be >= 1"),
    ({"kv_channels": 8.0}, "kv_channels=8.0", "must be an int"),
    ({"ffn_hidden_size": 0}, "ffn_hidden_size=0", "must be >= 1"),
    ({"ffn_hidden_size": -1}, "ffn_hidden_size=-1", "must be >= 1"),
    ({"normalization": "BatchNorm"}, "normalization='BatchNorm'", "must be one of LayerNorm, RMSNorm"),
    ({"normalization": None}, "normalization=None", "must be one of"),
    ({"layernorm_epsilon": 0.0}, "layernorm_epsilon=0.0", "must be > 0.0"),
    ({"layernorm_epsilon": -1e-5}, "layernorm_epsilon=-1e-05", "must be > 0.0"),
    ({"layernorm_epsilon": math.nan}, "layernorm_epsilon=nan", "must not be NaN"),
    ({"layernorm_epsilon": math.inf}, "layernorm_epsilon=inf", "must be a finite number"),
    ({"layernorm_epsilon": "1e-5"}, "layernorm_epsilon='1e-5'", "must be a number"),
    ({"layernorm_epsilon": False}, "layernorm_epsilon=False", "must be a number"),
    ({"init_method_std": 0}, "init_method_std=0", "must be > 0.0"),
    ({"attention_dropout": -0.1}, "attention_dropout=-0.1", "must be >= 0.0"),
    ({"attention_dropout": 1.5}, "attention_dropout=1.5", "must be < 1.0"),
    ({"hidden_dropout": 1.0}, "hidden_dropout=1.0", "must be < 1.0"),
    ({"hidden_dropout": math.nan}, "hidden_dropout=nan", "must not be NaN"),
    ({"softmax_scale": 0.0}, "softmax_scale=0.0", "must be > 0.0"),
    ({"softmax_scale": -math.inf}, "softmax_scale=-inf", "must be a finite number"),
    ({"rotary_base": 0}, "rotary_base=0", "must be > 0.0"),
    ({"rotary_base": 10**400}, "rotary_base=", "must be a finite number"),
    ({"rotary_percent": 0.0}, "rotary_percent=0.0", "must be > 0.0"),
    ({"rotary_percent": 1.01}, "rotary_percent=1.01", "must be <= 1.0"),
    ({"rope_scaling": "yarn"}, "rope_scaling='yarn'",
     "must be None, 'llama3', 'linear', 'dynamic' or 'longrope'"),
    ({"rope_short_factor": (1.0,) * 4}, "rope_short_factor=(1.0, 1.0, 1.0, 1.0)",
     "only used with rope_scaling='longrope'"),
    ({"rope_scaling": "longrope", "rope_short_factor": (1.0,) * 3, "rope_long_factor": (2.0,) * 4},
     "rope_short_factor=(1.0, 1.0, 1.0)", "must be a tuple of 4 numbers"),
    ({"rope_scaling": "longrope", "rope_short_factor": (1.0,) * 4},
     "rope_long_factor=None", "must be a tuple of 4 numbers"),
    ({"rope_scaling": "longrope", "rope_short_factor": (1.0, 0.0, 1.0, 1.0),
      "rope_long_factor": (1.0,) * 4}, "rope_short_factor entry=0.0", "must be > 0.0"),
    ({"rope_attention_factor": 0.0}, "rope_attention_factor=0.0", "must be > 0.0"),
    ({"rope_scaling_factor": 0.5}, "rope_scaling_factor=0.5", "must be >= 1.0"),
    ({"rope_low_freq_factor": 0.0}, "rope_low_freq_factor=0.0", "must be > 0.0"),
    ({"rope_high_freq_factor": -1.0}, "rope_high_freq_factor=-1.0", "must be > 0.0"),
    ({"rope_high_freq_factor": 1.0}, "rope_high_freq_factor=1.0",
     "must be greater than rope_low_freq_factor=1.0"),
    ({"rope_original_max_position_embeddings": 0}, "rope_original_max_position_embeddings=0",
     "must be >= 1"),
    ({"recompute_granularity": "partial"}, "recompute_granularity='partial'",
     "must be None, 'selective' or 'full'"),
    ({"qk_layernorm": 1}, "qk_layernorm=1", "must be True or False"),
    ({"add_bias_linear": None}, "add_bias_linear=None", "must be True or False"),
    ({"bf16": "yes"}, "bf16='yes'", "must be True or False"),
    ({"sequence_parallel": 0}, "sequence_parallel=0", "must be True or False"),
    ({"params_dtype": torch.int32}, "params_dtype=torch.int32", "must be a floating torch.dtype"),
    ({"params_dtype": "float32"}, "params_dtype='float32'", "must be a floating torch.dtype"),
    ({"activation_func": "gelu"}, "activation_func='gelu'", "must be a callable"),
]


@pytest.mark.parametrize(("overrides", "field_value", "rule"), INVALID,
                         ids=[case[1] for case in INVALID])
def test_invalid_value_raises_naming_field_value_rule(
    overrides: dict[str, Any], field_value: str, rule: str
) -> None:
    with pytest.raises(ValueError) as info:
        TransformerConfig(**{**BASE, **overrides})
    message = str(info.value)
    assert f"TransformerConfig.{field_value}" in message
    assert rule in message


def test_valid_edge_values() -> None:
    config = TransformerConfig(
        **BASE, attention_dropout=0.0, hidden_dropout=0, rotary_percent=1.0, softmax_scale=None,
        rope_scaling="llama3", rope_scaling_factor=1.0, recompute_granularity="full",
        normalization="RMSNorm", params_dtype=torch.bfloat16, activation_func=F.silu,
        num_query_groups=1,
    )
    assert config.num_query_groups == 1 and config.kv_channels == 8


MLA_INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"q_lora_rank": 0}, "q_lora_rank=0", "must be >= 1"),
    ({"q_lora_rank": 1.5}, "q_lora_rank=1.5", "must be an int"),
    ({"kv_lora_rank": 0}, "kv_lora_rank=0", "must be >= 1"),
    ({"kv_lora_rank": None}, "kv_lora_rank=None", "must be an int"),
    ({"qk_head_dim": 0}, "qk_head_dim=0", "must be >= 1"),
    ({"qk_pos_emb_head_dim": -2}, "qk_pos_emb_head_dim=-2", "must be >= 1"),
    ({"v_head_dim": 0}, "v_head_dim=0", "must be >= 1"),
    ({"rope_type": "ntk"}, "rope_type='ntk'", "must be 'rope' or 'yarn'"),
    ({"rotary_scaling_factor": 0.5}, "rotary_scaling_factor=0.5", "must be >= 1.0"),
    ({"original_max_position_embeddings": 0}, "original_max_position_embeddings=0", "must be >= 1"),
    ({"beta_fast": 0.0}, "beta_fast=0.0", "must be > 0.0"),
    ({"beta_slow": -1.0}, "beta_slow=-1.0", "must be > 0.0"),
    ({"beta_fast": 1.0, "beta_slow": 1.0}, "beta_fast=1.0", "must be greater than beta_slow=1.0"),
    ({"mscale": -0.1}, "mscale=-0.1", "must be >= 0.0"),
    ({"mscale_all_dim": math.nan}, "mscale_all_dim=nan", "must not be NaN"),
    ({"cache_mla_latents": 1}, "cache_mla_latents=1", "must be True or False"),
    ({"num_query_groups": 4}, "num_query_groups=4", "one key/value head per query head"),
    ({"normalization": "GroupNorm"}, "normalization='GroupNorm'", "must be one of"),
    ({"num_layers": 0}, "num_layers=0", "must be >= 1"),  # the base rules still apply
]


@pytest.mark.parametrize(("overrides", "field_value", "rule"), MLA_INVALID,
                         ids=[case[1] for case in MLA_INVALID])
def test_mla_invalid_value_raises(overrides: dict[str, Any], field_value: str, rule: str) -> None:
    with pytest.raises(ValueError) as info:
        MLATransformerConfig(**{**BASE, **overrides})
    message = str(info.value)
    assert f".{field_value}" in message
    assert rule in message


# ---------------------------------------------------------------------------------------------
# Random keyword arguments: a consistent config or a ValueError, never another exception.

_SENSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "num_layers": st.integers(1, 4),
    "hidden_size": st.sampled_from([8, 12, 16, 64]),
    "num_attention_heads": st.sampled_from([1, 2, 3, 4, 8]),
    "num_query_groups": st.sampled_from([None, 1, 2, 4]),
    "kv_channels": st.sampled_from([None, 4, 16]),
    "ffn_hidden_size": st.sampled_from([None, 32]),
    "normalization": st.sampled_from(["LayerNorm", "RMSNorm"]),
    "layernorm_epsilon": st.floats(1e-8, 1e-3),
    "init_method_std": st.floats(1e-3, 1.0),
    "attention_dropout": st.floats(0.0, 0.9),
    "hidden_dropout": st.floats(0.0, 0.9),
    "softmax_scale": st.one_of(st.none(), st.floats(0.01, 2.0)),
    "rotary_base": st.floats(1.0, 1e6),
    "rotary_percent": st.floats(0.1, 1.0),
    "rope_scaling": st.sampled_from([None, "llama3", "linear", "dynamic"]),
    "rope_scaling_factor": st.floats(1.0, 64.0),
    "rope_low_freq_factor": st.floats(0.5, 2.0),
    "rope_high_freq_factor": st.floats(2.5, 8.0),
    "rope_original_max_position_embeddings": st.integers(1, 8192),
    "recompute_granularity": st.sampled_from([None, "selective", "full"]),
    "params_dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    "activation_func": st.sampled_from([F.gelu, F.silu, torch.relu]),
}
_BOOLS = ("qk_layernorm", "add_bias_linear", "add_qkv_bias", "gated_linear_unit",
          "perform_initialization", "attention_softmax_in_fp32", "rotary_interleaved",
          "sequence_parallel", "delay_wgrad_compute", "bf16")
_SENSIBLE.update({name: st.booleans() for name in _BOOLS})

_WILD: st.SearchStrategy[Any] = st.one_of(
    st.integers(-3, 70),
    st.integers(),  # unbounded: huge and negative ints
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 10**400, -(10**400), 1e308, -0.0]),
    st.text(max_size=6),
    st.sampled_from(["LayerNorm", "RMSNorm", "llama3", "selective", "full", "rope", "yarn"]),
    st.sampled_from([torch.int64, torch.float64, F.relu, [1], {"a": 1}, (2,), b"x", 2j]),
)
_OMIT = object()

_MLA_SENSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "q_lora_rank": st.sampled_from([None, 4, 16]),
    "kv_lora_rank": st.integers(1, 16),
    "qk_head_dim": st.integers(1, 16),
    "qk_pos_emb_head_dim": st.sampled_from([2, 4, 8]),
    "v_head_dim": st.integers(1, 16),
    "rope_type": st.sampled_from(["rope", "yarn"]),
    "rotary_scaling_factor": st.floats(1.0, 64.0),
    "original_max_position_embeddings": st.integers(1, 4096),
    "beta_fast": st.floats(8.0, 64.0),
    "beta_slow": st.floats(0.5, 4.0),
    "mscale": st.floats(0.0, 2.0),
    "mscale_all_dim": st.floats(0.0, 2.0),
    "cache_mla_latents": st.booleans(),
}


@st.composite
def _kwargs(draw: st.DrawFn, sensible: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """Sensible values (or omitted) everywhere except one to three fields that get wild values.

    Perturbing only a few fields keeps most examples close to valid, so a wild value is seen
    by the validation that follows it rather than masked by an earlier failure.
    """
    wild_fields = draw(st.sets(st.sampled_from(sorted(sensible)), min_size=0, max_size=3))
    kwargs: dict[str, Any] = {}
    for name, good in sensible.items():
        required = name in ("num_layers", "hidden_size", "num_attention_heads")
        if name in wild_fields:
            value = draw(_WILD)
        else:
            value = draw(good if required else st.one_of(st.just(_OMIT), good))
        if value is not _OMIT:
            kwargs[name] = value
    return kwargs


def _assert_consistent(config: TransformerConfig, kwargs: dict[str, Any]) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_finite(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    heads, groups = config.num_attention_heads, config.num_query_groups
    for value in (config.num_layers, config.hidden_size, heads, groups, config.kv_channels,
                  config.ffn_hidden_size, config.rope_original_max_position_embeddings):
        assert is_int(value) and value >= 1
    assert groups is not None and heads % groups == 0
    if kwargs.get("num_query_groups") is None:
        assert groups == heads
    if kwargs.get("kv_channels") is None:
        assert config.hidden_size % heads == 0
        assert config.kv_channels == config.hidden_size // heads
    if kwargs.get("ffn_hidden_size") is None:
        assert config.ffn_hidden_size == 4 * config.hidden_size
    assert config.normalization in ("LayerNorm", "RMSNorm")
    for value in (config.layernorm_epsilon, config.init_method_std, config.rotary_base,
                  config.rope_low_freq_factor):
        assert is_finite(value) and value > 0
    for value in (config.attention_dropout, config.hidden_dropout):
        assert is_finite(value) and 0 <= value < 1
    assert is_finite(config.rotary_percent) and 0 < config.rotary_percent <= 1
    assert config.softmax_scale is None or (is_finite(config.softmax_scale) and config.softmax_scale > 0)
    assert is_finite(config.rope_scaling_factor) and config.rope_scaling_factor >= 1
    assert config.rope_high_freq_factor > config.rope_low_freq_factor
    assert config.rope_scaling in (None, "llama3", "linear", "dynamic")
    assert config.recompute_granularity in (None, "selective", "full")
    for name in _BOOLS:
        assert isinstance(getattr(config, name), bool)
    assert isinstance(config.params_dtype, torch.dtype) and config.params_dtype.is_floating_point
    assert callable(config.activation_func)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_kwargs(_SENSIBLE))
def test_random_kwargs_give_consistent_config_or_value_error(kwargs: dict[str, Any]) -> None:
    try:
        config = TransformerConfig(**kwargs)
    except ValueError as error:
        assert str(error).startswith("TransformerConfig.")
        return
    _assert_consistent(config, kwargs)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_kwargs({**_SENSIBLE, **_MLA_SENSIBLE}))
def test_random_mla_kwargs_give_consistent_config_or_value_error(kwargs: dict[str, Any]) -> None:
    try:
        config = MLATransformerConfig(**kwargs)
    except ValueError:
        return
    _assert_consistent(config, kwargs)
    assert config.num_query_groups == config.num_attention_heads
    for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
                 "original_max_position_embeddings"):
        value = getattr(config, name)
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 1
    assert config.q_lora_rank is None or config.q_lora_rank >= 1
    assert config.rope_type in ("rope", "yarn")
    assert config.beta_fast > config.beta_slow > 0
    assert config.mscale >= 0 and config.mscale_all_dim >= 0


def test_config_is_a_dataclass_with_megatron_names() -> None:
    names = {field.name for field in dataclasses.fields(TransformerConfig)}
    assert {"num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "ffn_hidden_size", "add_bias_linear", "gated_linear_unit", "layernorm_epsilon"} <= names


# ---------------------------------------------------------------------------------------------
# Mixture of experts: Megatron-Core's field names, derived defaults and invalid combinations.

MOE: dict[str, Any] = {**BASE, "num_moe_experts": 8}


def test_moe_defaults_and_layer_pattern() -> None:
    dense = TransformerConfig(**BASE)
    assert dense.num_moe_experts is None and dense.moe_layer_pattern == (False, False)
    config = TransformerConfig(**{**MOE, "num_layers": 5}, moe_layer_freq=2)
    assert config.moe_ffn_hidden_size == config.ffn_hidden_size == 256  # defaults to the dense width
    assert config.moe_layer_pattern == (True, False, True, False, True)  # layers 0, N, 2N
    first_k_dense = TransformerConfig(**{**MOE, "num_layers": 4}, moe_layer_freq=[0, 1, 1, 1])
    assert first_k_dense.moe_layer_pattern == (False, True, True, True)
    assert TransformerConfig(**MOE, moe_layer_freq=(1, 0)).moe_layer_freq == [1, 0]


@pytest.mark.parametrize(("overrides", "normalized"), [
    ({}, True),                                                    # Mixtral, Qwen3 norm_topk_prob
    ({"moe_router_pre_softmax": True}, False),                     # Qwen2-MoE, OLMoE
    ({"moe_router_score_function": "sigmoid"}, True),              # DeepSeek-V3 (Megatron default)
    ({"moe_router_score_function": "sigmoid", "moe_router_pre_softmax": True}, True),
    ({"moe_router_score_function": "sigmoid", "moe_router_norm_topk_prob": False}, False),
    ({"moe_router_norm_topk_prob": True}, True),
])
def test_moe_topk_normalisation_rule(overrides: dict[str, Any], normalized: bool) -> None:
    assert TransformerConfig(**MOE, **overrides).moe_normalizes_topk_probs is normalized


def test_moe_fields_on_mla_config() -> None:
    config = MLATransformerConfig(**MOE, moe_router_score_function="sigmoid",
                                  moe_router_num_groups=4, moe_router_group_topk=2,
                                  moe_router_enable_expert_bias=True,
                                  moe_shared_expert_intermediate_size=32)
    assert config.moe_router_num_groups == 4 and config.num_moe_experts == 8


MOE_INVALID: list[tuple[dict[str, Any], str, str]] = [
    ({"num_moe_experts": 0}, "num_moe_experts=0", "must be >= 1"),
    ({"num_moe_experts": None, "moe_ffn_hidden_size": 8}, "moe_ffn_hidden_size=8",
     "needs num_moe_experts"),
    ({"num_moe_experts": None, "expert_model_parallel_size": 2}, "expert_model_parallel_size=2",
     "needs num_moe_experts"),
    ({"num_moe_experts": None, "moe_shared_expert_intermediate_size": 8},
     "moe_shared_expert_intermediate_size=8", "needs num_moe_experts"),
    ({"moe_ffn_hidden_size": 0}, "moe_ffn_hidden_size=0", "must be >= 1"),
    ({"moe_router_topk": 9}, "moe_router_topk=9", "must be <= num_moe_experts=8"),
    ({"moe_router_topk": 0}, "moe_router_topk=0", "must be >= 1"),
    ({"moe_router_topk": 1}, "moe_router_pre_softmax=False", "must be True with moe_router_topk=1"),
    ({"moe_router_score_function": "relu"}, "moe_router_score_function='relu'",
     "must be 'softmax' or 'sigmoid'"),
    ({"moe_router_pre_softmax": 1}, "moe_router_pre_softmax=1", "must be True or False"),
    ({"moe_router_norm_topk_prob": False}, "moe_router_norm_topk_prob=False",
     "moe_router_pre_softmax decides it"),
    ({"moe_router_topk_scaling_factor": 0.0}, "moe_router_topk_scaling_factor=0.0", "must be > 0.0"),
    ({"moe_router_num_groups": 4}, "moe_router_group_topk=None", "needs both"),
    ({"moe_router_group_topk": 2}, "moe_router_num_groups=None", "needs both"),
    ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "moe_router_num_groups=3",
     "must divide num_moe_experts=8"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 3}, "moe_router_group_topk=3",
     "must be <= moe_router_num_groups=4 and <= moe_router_topk=2"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 1, "moe_router_topk": 3},
     "moe_router_topk=3", "must be <= group_topk * experts per group = 2"),
    ({"moe_router_dtype": "bf16"}, "moe_router_dtype='bf16'", "must be None, 'fp32' or 'fp64'"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias=True",
     "needs moe_router_score_function='sigmoid'"),
    ({"moe_router_bias_update_rate": -1.0}, "moe_router_bias_update_rate=-1.0", "must be >= 0.0"),
    ({"moe_aux_loss_coeff": -0.1}, "moe_aux_loss_coeff=-0.1", "must be >= 0.0"),
    ({"moe_z_loss_coeff": math.nan}, "moe_z_loss_coeff=nan", "must not be NaN"),
    ({"moe_shared_expert_intermediate_size": 0}, "moe_shared_expert_intermediate_size=0",
     "must be >= 1"),
    ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate=True",
     "set moe_shared_expert_intermediate_size too"),
    ({"moe_expert_capacity_factor": 0.0}, "moe_expert_capacity_factor=0.0", "must be > 0.0"),
    ({"moe_token_drop_policy": "random"}, "moe_token_drop_policy='random'",
     "must be 'probs' or 'position'"),
    ({"expert_model_parallel_size": 3}, "expert_model_parallel_size=3",
     "must divide num_moe_experts=8"),
    ({"expert_model_parallel_size": 0}, "expert_model_parallel_size=0", "must be >= 1"),
    ({"moe_layer_freq": 0}, "moe_layer_freq=0", "must be >= 1"),
    ({"moe_layer_freq": [1, 0, 1]}, "moe_layer_freq=[1, 0, 1]", "one 0 (dense) or 1 (MoE) per layer"),
    ({"moe_layer_freq": [1, 2]}, "moe_layer_freq=[1, 2]", "one 0 (dense) or 1 (MoE) per layer"),
    ({"moe_layer_freq": [True, False]}, "moe_layer_freq=[True, False]", "per layer (2 entries)"),
]


@pytest.mark.parametrize(("overrides", "field_value", "rule"), MOE_INVALID,
                         ids=[case[1] for case in MOE_INVALID])
def test_moe_invalid_combination_raises_naming_field(
    overrides: dict[str, Any], field_value: str, rule: str
) -> None:
    for cls in (TransformerConfig, MLATransformerConfig):
        with pytest.raises(ValueError) as info:
            cls(**{**MOE, **overrides})
        message = str(info.value)
        assert f"TransformerConfig.{field_value}" in message
        assert rule in message
