"""Phi-3 decoders (`Phi3ForCausalLM`) <-> protoformer's `gpt_layer_spec` layers.

Phi-3 is the Llama layout (RMSNorm, SwiGLU, GQA, no biases) with two fused projections in the
checkpoint: `qkv_proj` stores all query rows, then all key rows, then all value rows (our
`linear_qkv` groups them per key/value group: `split` then `fuse_qkv`), and `gate_up_proj`
stores the gate rows then the up rows, which is our `linear_fc1` as it is. Options: partial
rotary (`partial_rotary_factor` -> `rotary_percent`), LongRoPE (`rope_type` "longrope", or the
older "su"/"yarn" names Phi-3 configs used for it: `short_factor`/`long_factor` ->
`rope_short_factor`/`rope_long_factor`, the attention scaling -> `rope_attention_factor`),
a sliding window on every layer (`sliding_window`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer.architectures.conversion import (
    DESCRIBED_FIELDS,
    ConfigReader,
    HFConversionError,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    activation_name,
    checked_config,
    hf_model_info,
    owned,
    read_partial_rotary_factor,
    read_rope,
    same,
)
from protoformer.architectures.conversion import model_rules as causal_model_rules
from protoformer.architectures.decoder_config import (
    decoder_config_values,
    read_decoder_config,
    read_head_dim,
)
from protoformer.architectures.llama import dense_layer_specs, fuse_qkv, split_qkv
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import RopeScaling, TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs

__all__ = ["Phi3Architecture", "export_phi3_config", "longrope_attention_factor",
           "parse_phi3_config"]

_HF_CLASS = "Phi3ForCausalLM"
_WHERE = f"{_HF_CLASS} config"
_LONGROPE_NAMES = ("longrope", "su", "yarn")  # Phi-3 configs name LongRoPE "su" or "yarn" too


# ------------------------------------------------------------------ config: HF -> protoformer
def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """LongRoPE's default attention scaling for a context stretched `factor` times:
    `sqrt(1 + ln(factor) / ln(original))`, or 1 when nothing is stretched."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position_embeddings))


def _factors(rope: ConfigReader, key: str) -> tuple[float, ...]:
    value = rope.values.get(key)
    if not isinstance(value, list):
        raise HFConversionError(f"{rope.where}: LongRoPE needs {key!r}, a list of numbers "
                                "(one per rotary channel pair)")
    items = [item for item in value if isinstance(item, (int, float))  # pyright: ignore[reportUnknownVariableType]  # JSON list
             and not isinstance(item, bool)]
    if len(items) != len(value):  # pyright: ignore[reportUnknownArgumentType]  # JSON list
        raise HFConversionError(f"{rope.where}: {key} must be a list of numbers")
    return tuple(float(item) for item in items)


def _window(reader: ConfigReader) -> int | None:
    """Every layer's attention window, or None when it blocks nothing."""
    window = reader.get_optional_int("sliding_window")
    if window is None or window >= reader.get_int("max_position_embeddings"):
        return None
    if window < 1:
        raise HFConversionError(f"{reader.where}: sliding_window={window} must be >= 1 or null")
    return window


def parse_phi3_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """A Phi-3 config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, _WHERE)
    head_dim = read_head_dim(reader)
    max_positions = reader.get_int("max_position_embeddings")
    rope_type, theta, rope = read_rope(reader, partial_rotary=True)
    partial = read_partial_rotary_factor(reader, rope)
    scaling: RopeScaling | None = None
    short: tuple[float, ...] | None = None
    long: tuple[float, ...] | None = None
    attention_factor = 1.0
    # Phi-3 keeps the pretraining length at the top level; transformers' Phi3Config always has
    # it (default 4096) and it wins over the rope parameters'.
    original = reader.get_int("original_max_position_embeddings", 4096)
    if rope_type in _LONGROPE_NAMES:
        scaling, short, long = "longrope", _factors(rope, "short_factor"), _factors(rope, "long_factor")
        factor = rope.get_float("factor", max_positions / original)
        attention_factor = rope.get_float("attention_factor",
                                          longrope_attention_factor(factor, original))
    elif rope_type != "default":
        raise UnsupportedHFModelError(f"{reader.where}: rope_type={rope_type!r} is not supported; "
                                      "protoformer maps 'default' and 'longrope' for phi3")
    dropouts = {key: reader.get_float(key, 0.0) for key in ("resid_pdrop", "embd_pdrop")}
    if dropouts["resid_pdrop"] != dropouts["embd_pdrop"]:
        raise UnsupportedHFModelError(
            f"{reader.where}: resid_pdrop={dropouts['resid_pdrop']} differs from embd_pdrop="
            f"{dropouts['embd_pdrop']}; protoformer's hidden_dropout covers both")
    base = read_decoder_config(reader, dtype, head_dim=head_dim, rotary_base=theta,
                               layernorm_epsilon=1e-5)
    config = checked_config(reader, lambda: dataclasses.replace(
        base,
        hidden_dropout=dropouts["resid_pdrop"],
        rotary_percent=partial,
        rope_scaling=scaling,
        rope_original_max_position_embeddings=original,
        rope_short_factor=short,
        rope_long_factor=long,
        rope_attention_factor=attention_factor,
    ))
    _window(reader)  # a malformed window fails here, with the config
    names: tuple[str, ...] = (*DESCRIBED_FIELDS, "num_query_groups", "kv_channels", "rope_scaling",
             "rope_short_factor", "rope_long_factor", "rope_attention_factor")
    if scaling is not None:
        names += ("rope_original_max_position_embeddings",)
    return hf_model_info(reader, config, model_type="phi3", architecture=_HF_CLASS,
                         described_fields=names)


# ------------------------------------------------------------------ tensors
def _qkv_rule(ours: str, theirs: str, config: TransformerConfig) -> TensorRule:
    """Our grouped `linear_qkv` <-> Phi-3's `qkv_proj` (all q rows, all k rows, all v rows)."""
    heads, groups, head_dim = config.num_attention_heads, config.query_groups, config.head_dim
    sizes = [heads * head_dim, groups * head_dim, groups * head_dim]

    def to_ours(parts: Sequence[Tensor]) -> Tensor:
        q, k, v = torch.split(parts[0], sizes, dim=0)  # [np * hn, h], [ng * hn, h] x 2
        return fuse_qkv(q, k, v, heads=heads, groups=groups, head_dim=head_dim)

    def to_theirs(fused: Tensor) -> tuple[Tensor, ...]:
        q, k, v = split_qkv(fused, heads=heads, groups=groups, head_dim=head_dim)
        return (owned(torch.cat((q, k, v), dim=0)),)  # [(np + 2 ng) * hn, h]

    return TensorRule(f"{ours}.linear_qkv.weight", (f"{theirs}.qkv_proj.weight",),
                      to_ours, to_theirs)


def _attention_rules(info: HFModelInfo, ours: str, theirs: str) -> list[TensorRule]:
    return [_qkv_rule(ours, theirs, info.config),
            same(f"{ours}.linear_proj.weight", f"{theirs}.o_proj.weight")]


def _mlp_rules(info: HFModelInfo, index: int, ours: str, theirs: str) -> list[TensorRule]:
    del info, index  # gate rows then up rows: our gated linear_fc1 as it is
    return [same(f"{ours}.mlp.linear_fc1.weight", f"{theirs}.mlp.gate_up_proj.weight"),
            same(f"{ours}.mlp.linear_fc2.weight", f"{theirs}.mlp.down_proj.weight")]


# ------------------------------------------------------------------ config: protoformer -> HF
def _check_exportable(config: TransformerConfig) -> None:
    problems: list[str] = []
    if type(config) is not TransformerConfig:
        problems.append(f"a {type(config).__name__} (Phi-3 takes a plain TransformerConfig)")
    if config.num_moe_experts is not None:
        problems.append("mixture-of-experts layers (Phi-3 is dense)")
    if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
        problems.append("Phi-3's norms are plain RMSNorm")
    if not config.gated_linear_unit or config.add_bias_linear or config.add_qkv_bias:
        problems.append("Phi-3 has a gated MLP and no biases")
    if config.qk_layernorm or config.rotary_interleaved or config.softmax_scale is not None:
        problems.append("Phi-3 has no q/k norms, rotates halves and scales by 1/sqrt(head_dim)")
    if config.rope_scaling not in (None, "longrope"):
        problems.append(f"rope_scaling={config.rope_scaling!r} (Phi-3 has LongRoPE or none)")
    if config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None:
        problems.append("soft-capping (Phi-3 has none)")
    if config.embedding_multiplier != 1.0:
        problems.append(f"embedding_multiplier={config.embedding_multiplier} (Phi-3 has none)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))


def export_phi3_config(config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
    """A config.json mapping for a Phi-3 model with `config` and `sizes`."""
    _check_exportable(config)
    rope: JSONDict = {"rope_type": "default", "rope_theta": config.rotary_base,
                      "partial_rotary_factor": config.rotary_percent}
    original = sizes.max_sequence_length
    if config.rope_scaling == "longrope":
        original = config.rope_original_max_position_embeddings
        rope.update(rope_type="longrope", short_factor=list(config.rope_short_factor or ()),
                    long_factor=list(config.rope_long_factor or ()),
                    attention_factor=config.rope_attention_factor)
    values = decoder_config_values(config, sizes, model_type="phi3", hf_class=_HF_CLASS)
    values.update({
        "intermediate_size": config.ffn_size,
        "hidden_act": activation_name(config),
        "original_max_position_embeddings": original,
        "resid_pdrop": config.hidden_dropout,
        "embd_pdrop": config.hidden_dropout,
        "rope_parameters": rope,
        "partial_rotary_factor": config.rotary_percent,
        "sliding_window": None,
    })
    return values


# ------------------------------------------------------------------ the registered architecture
@dataclass(frozen=True)
class Phi3Architecture:
    """Phi-3 (`model_type` "phi3"), a `CausalLMArchitecture`. A model not read from Hugging
    Face exports as Llama, so Phi-3 is not a default export."""

    model_type: str = "phi3"
    hf_class: str = _HF_CLASS
    exports_by_default: bool = False

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_phi3_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        window = _window(ConfigReader(info.hf_config, _WHERE))
        return dense_layer_specs(backend, info.config, (window,) * info.config.num_layers)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return causal_model_rules(info, _attention_rules, _mlp_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_phi3_config(config, sizes)


register_architecture(Phi3Architecture())


# ------------------------------------------------------------------ presets of published sizes
def _phi3_mini() -> TransformerConfig:
    # microsoft/Phi-3-mini-4k-instruct: 32 layers, hidden 3072, 32 heads of 96 (no GQA),
    # SwiGLU 8192, RMSNorm 1e-5, RoPE base 10000 over whole heads, vocabulary 32064.
    return TransformerConfig(
        num_layers=32, hidden_size=3072, num_attention_heads=32, ffn_hidden_size=8192,
        normalization="RMSNorm", layernorm_epsilon=1e-5, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, attention_dropout=0.0,
        hidden_dropout=0.0, rotary_base=10000.0, params_dtype=torch.bfloat16, bf16=True)


register_preset(Preset(
    "phi3-mini-4k", "Phi-3-mini 4k shapes (32 layers, hidden 3072, 32 heads of 96, SwiGLU "
    "8192, vocab 32064, 4096 positions)", _phi3_mini, vocab_size=32064,
    max_sequence_length=4096, layer_spec=gpt_layer_spec, tie_embeddings=False))
