"""GPT-NeoX decoders (`GPTNeoXForCausalLM`: Pythia, GPT-NeoX-20B) <-> `gpt_layer_spec` layers.

GPT-NeoX: LayerNorm with bias, biases on every linear, a plain (not gated) GeLU MLP, rotary
embeddings over the first `rotary_pct` (`partial_rotary_factor`) of each head, and the
parallel residual `x + attn(ln1(x)) + mlp(ln2(x))` (`use_parallel_residual`, the layer spec's
`parallel_residual`). Its fused `query_key_value` stores per head `[q | k | v]`, which is
protoformer's grouped `linear_qkv` layout with one query head per group: the tensors copy
unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protoformer.architectures.conversion import (
    DESCRIBED_FIELDS,
    ConfigReader,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    activation_for,
    activation_name,
    checked_config,
    hf_model_info,
    read_partial_rotary_factor,
    same,
)
from protoformer.architectures.decoder_config import (
    require_default_rope,
)
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.layer import TransformerLayerSubmodules

__all__ = ["GPTNeoXArchitecture", "export_gpt_neox_config", "gpt_neox_layer_spec",
           "parse_gpt_neox_config"]

_HF_CLASS = "GPTNeoXForCausalLM"
_WHERE = f"{_HF_CLASS} config"


def gpt_neox_layer_spec(backend: BackendSpecProvider, config: TransformerConfig, *,
                        parallel_residual: bool = True) -> TransformerLayerSubmodules:
    """The GPT-NeoX layer: `gpt_layer_spec` with the parallel residual (by default)."""
    return gpt_layer_spec(backend, config, parallel_residual=parallel_residual)


# ------------------------------------------------------------------ config: HF -> protoformer
def parse_gpt_neox_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """A GPT-NeoX config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, _WHERE)
    _, rope = require_default_rope(reader, "gpt_neox", partial_rotary=True)
    # Older configs name the rotary settings `rotary_emb_base` and `rotary_pct` (default 1/4).
    theta = rope.get_float("rope_theta", reader.get_float(
        "rope_theta", reader.get_float("rotary_emb_base", 10000.0)))
    partial = read_partial_rotary_factor(reader, rope, key="rotary_pct", default=0.25)
    if not reader.get_bool("attention_bias", True):
        raise UnsupportedHFModelError(
            f"{reader.where}: attention_bias=false leaves query_key_value and dense without "
            "the bias the MLP keeps; protoformer's add_bias_linear biases all of them together")
    config = checked_config(reader, lambda: TransformerConfig(
        num_layers=reader.get_int("num_hidden_layers"),
        hidden_size=reader.get_int("hidden_size"),
        num_attention_heads=reader.get_int("num_attention_heads"),
        ffn_hidden_size=reader.get_int("intermediate_size"),
        normalization="LayerNorm",
        layernorm_epsilon=reader.get_float("layer_norm_eps", 1e-5),
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=activation_for(ConfigReader(
            {"hidden_act": reader.get_str("hidden_act", "gelu")}, reader.where)),
        init_method_std=reader.get_float("initializer_range", 0.02),
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_dropout=reader.get_float("attention_dropout", 0.0),
        hidden_dropout=reader.get_float("hidden_dropout", 0.0),
        rotary_base=theta,
        rotary_percent=partial,
    ))
    return hf_model_info(reader, config, model_type="gpt_neox", architecture=_HF_CLASS,
                         described_fields=DESCRIBED_FIELDS)


def _parallel_residual(info: HFModelInfo) -> bool:
    return ConfigReader(info.hf_config, _WHERE).get_bool("use_parallel_residual", True)


# ------------------------------------------------------------------ tensors
def _tensor_rules(info: HFModelInfo) -> list[TensorRule]:
    rules = [same("embedding.weight", "gpt_neox.embed_in.weight")]
    pairs = (("input_layernorm", "input_layernorm"),
             ("pre_mlp_layernorm", "post_attention_layernorm"),
             ("self_attention.linear_qkv", "attention.query_key_value"),
             ("self_attention.linear_proj", "attention.dense"),
             ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
             ("mlp.linear_fc2", "mlp.dense_4h_to_h"))
    for index in range(info.config.num_layers):
        ours, theirs = f"decoder.layers.{index}", f"gpt_neox.layers.{index}"
        for our_name, their_name in pairs:
            for kind in ("weight", "bias"):
                rules.append(same(f"{ours}.{our_name}.{kind}", f"{theirs}.{their_name}.{kind}"))
    for kind in ("weight", "bias"):
        rules.append(same(f"decoder.final_layernorm.{kind}", f"gpt_neox.final_layer_norm.{kind}"))
    if not info.tie_word_embeddings:
        rules.append(same("output_layer.weight", "lm_head.weight"))
    return rules


# ------------------------------------------------------------------ config: protoformer -> HF
def _check_exportable(config: TransformerConfig) -> None:
    problems: list[str] = []
    if type(config) is not TransformerConfig:
        problems.append(f"a {type(config).__name__} (GPT-NeoX takes a plain TransformerConfig)")
    if config.num_moe_experts is not None:
        problems.append("mixture-of-experts layers (GPT-NeoX is dense)")
    if config.normalization != "LayerNorm" or config.layernorm_zero_centered_gamma:
        problems.append("GPT-NeoX's norms are LayerNorm with bias")
    if config.gated_linear_unit or not config.add_bias_linear:
        problems.append("GPT-NeoX has a plain MLP and biases on every linear")
    if config.query_groups != config.num_attention_heads:
        problems.append(f"num_query_groups={config.query_groups} (GPT-NeoX has one key/value "
                        "head per query head)")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"kv_channels={config.head_dim} (GPT-NeoX heads are hidden_size / "
                        "num_attention_heads wide)")
    if config.qk_layernorm or config.rotary_interleaved or config.softmax_scale is not None \
            or config.rope_scaling is not None:
        problems.append("GPT-NeoX has no q/k norms, plain rotary embeddings of halves and "
                        "scales by 1/sqrt(head_dim)")
    if config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None:
        problems.append("soft-capping (GPT-NeoX has none)")
    if config.embedding_multiplier != 1.0:
        problems.append(f"embedding_multiplier={config.embedding_multiplier} (GPT-NeoX has none)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))


def export_gpt_neox_config(config: TransformerConfig, sizes: ModelSizes, *,
                           parallel_residual: bool) -> JSONDict:
    """A config.json mapping for a GPT-NeoX model with `config` and `sizes`."""
    _check_exportable(config)
    return {
        "architectures": [_HF_CLASS],
        "model_type": "gpt_neox",
        "vocab_size": sizes.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "hidden_act": activation_name(config),
        "max_position_embeddings": sizes.max_sequence_length,
        "layer_norm_eps": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "attention_dropout": config.attention_dropout,
        "hidden_dropout": config.hidden_dropout,
        "attention_bias": True,
        "use_parallel_residual": parallel_residual,
        "tie_word_embeddings": sizes.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base,
                            "partial_rotary_factor": config.rotary_percent},
        "rotary_emb_base": config.rotary_base,
        "rotary_pct": config.rotary_percent,
        "use_cache": True,
    }


# ------------------------------------------------------------------ the registered architecture
@dataclass(frozen=True)
class GPTNeoXArchitecture:
    """GPT-NeoX (`model_type` "gpt_neox"), a `CausalLMArchitecture`. Its parallel residual is
    read from config.json; a native model exports as GPT-NeoX only when asked for by name
    (it writes `use_parallel_residual` from its layers), so it is not a default export."""

    model_type: str = "gpt_neox"
    hf_class: str = _HF_CLASS
    exports_by_default: bool = False

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_gpt_neox_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        return gpt_neox_layer_spec(backend, info.config,
                                   parallel_residual=_parallel_residual(info))

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return _tensor_rules(info)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_gpt_neox_config(config, sizes, parallel_residual=True)


# Pythia and GPT-NeoX-20B checkpoint files (transformers 4) name the output layer embed_out
# and may store each layer's causal-mask buffers (transformers skips them too).
register_architecture(GPTNeoXArchitecture(),
                      renamed_tensors={"embed_out.weight": "lm_head.weight"},
                      unused_tensor_suffixes=(".attention.bias", ".attention.masked_bias"))


# ------------------------------------------------------------------ presets of published sizes
def _pythia_1b() -> TransformerConfig:
    # EleutherAI/pythia-1b: 16 layers, hidden 2048, 8 heads of 256 (rotary on the first
    # quarter), GeLU MLP 8192, LayerNorm 1e-5, biases everywhere, parallel residual.
    return TransformerConfig(
        num_layers=16, hidden_size=2048, num_attention_heads=8, ffn_hidden_size=8192,
        normalization="LayerNorm", layernorm_epsilon=1e-5, add_bias_linear=True,
        gated_linear_unit=False, activation_func=F.gelu, attention_dropout=0.0,
        hidden_dropout=0.0, rotary_base=10000.0, rotary_percent=0.25,
        params_dtype=torch.float16)


register_preset(Preset(
    "pythia-1b", "Pythia 1B shapes (GPT-NeoX: 16 layers, hidden 2048, 8 heads, rotary on 1/4 "
    "of each head, GeLU MLP 8192, LayerNorm and biases, parallel residual, vocab 50304)",
    _pythia_1b, vocab_size=50304, max_sequence_length=2048, layer_spec=gpt_neox_layer_spec,
    tie_embeddings=False))
