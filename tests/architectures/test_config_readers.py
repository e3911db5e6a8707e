"""The config.json fields every Llama-style family shares (`architectures.decoder_config`):
head size, plain-rotary refusal, the base config read, the values written (expected values
written out here from the inputs, not read back from the code under test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protoformer.architectures.conversion import (
    ConfigReader,
    HFConversionError,
    UnsupportedHFModelError,
)
from protoformer.architectures.decoder_config import (
    decoder_config_values,
    read_decoder_config,
    read_head_dim,
    require_default_rope,
)
from protoformer.architectures.registry import ModelSizes
from protoformer.config import TransformerConfig
from protoformer.transformer.mlp import gelu_tanh


def reader(**values: object) -> ConfigReader:
    return ConfigReader({"hidden_size": 96, "num_attention_heads": 4, **values}, "Test config")


def test_head_dim_is_the_configs_when_given_else_hidden_over_heads() -> None:
    assert read_head_dim(reader(head_dim=40)) == 40
    assert read_head_dim(reader()) == 24
    assert read_head_dim(reader(head_dim=None)) == 24


def test_head_dim_that_cannot_be_derived_is_one_clear_error() -> None:
    with pytest.raises(HFConversionError, match=r"^Test config: hidden_size=96 is not "
                       r"divisible by num_attention_heads=5 and head_dim is not given$"):
        read_head_dim(reader(num_attention_heads=5))


@pytest.mark.parametrize(("values", "theta"), [
    ({}, 10000.0),
    ({"rope_theta": 5e5}, 5e5),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6),
    ({"rope_scaling": {"type": "default"}, "rope_theta": 2e4}, 2e4),
])
def test_default_rope_gives_its_base(values: dict[str, object], theta: float) -> None:
    base, _ = require_default_rope(reader(**values), "fam")
    assert base == theta


@pytest.mark.parametrize("values", [
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"type": "yarn", "factor": 2.0}},
])
def test_other_rope_types_are_refused_naming_the_family(values: dict[str, object]) -> None:
    with pytest.raises(UnsupportedHFModelError,
                       match=r"rope_type='(linear|yarn)' is not supported; protoformer maps "
                             r"'default' for fam$"):
        require_default_rope(reader(**values), "fam")


def test_partial_rotation_is_refused_unless_the_family_reads_it() -> None:
    partial = reader(partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedHFModelError, match=r"partial_rotary_factor=0\.5"):
        require_default_rope(partial, "fam")
    _, rope = require_default_rope(partial, "fam", partial_rotary=True)
    assert rope.values == {}


def test_decoder_config_reads_the_llama_style_fields() -> None:
    values = reader(num_hidden_layers=3, num_key_value_heads=2, intermediate_size=200,
                    rms_norm_eps=1e-5, initializer_range=0.03, attention_dropout=0.1,
                    hidden_act="gelu_pytorch_tanh")
    config = read_decoder_config(values, torch.bfloat16, head_dim=32, rotary_base=1e4)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (3, 96, 4)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (2, 32, 200)
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-5
    assert config.gated_linear_unit and not config.add_bias_linear
    assert config.activation_func is gelu_tanh
    assert config.init_method_std == 0.03 and not config.perform_initialization
    assert config.params_dtype == torch.bfloat16 and config.bf16
    assert (config.attention_dropout, config.hidden_dropout, config.rotary_base) == (0.1, 0.0, 1e4)


def test_decoder_config_defaults_and_overrides() -> None:
    values = reader(num_hidden_layers=1, intermediate_size=200)
    config = read_decoder_config(values, torch.float32, head_dim=24, rotary_base=1e4,
                                 ffn_hidden_size=64, layernorm_epsilon=1e-5,
                                 activation_func=F.relu)
    assert config.num_query_groups == 4 and config.ffn_hidden_size == 64
    assert config.layernorm_epsilon == 1e-5 and config.activation_func is F.relu
    assert config.init_method_std == 0.02 and not config.bf16


def test_decoder_config_validation_names_the_config() -> None:
    with pytest.raises(HFConversionError, match=r"^Test config: .*num_query_groups"):
        read_decoder_config(reader(num_hidden_layers=1, intermediate_size=8,
                                   num_key_value_heads=3), torch.float32, head_dim=24,
                            rotary_base=1e4)


def test_decoder_config_values_are_the_shared_config_json_keys() -> None:
    config = TransformerConfig(num_layers=3, hidden_size=96, num_attention_heads=4,
                               num_query_groups=2, kv_channels=32, layernorm_epsilon=1e-5,
                               init_method_std=0.03, attention_dropout=0.1)
    values = decoder_config_values(config, ModelSizes(1000, 512, True), model_type="llama",
                                   hf_class="LlamaForCausalLM")
    assert values == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000,
        "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "initializer_range": 0.03, "attention_dropout": 0.1,
        "tie_word_embeddings": True, "use_cache": True}
