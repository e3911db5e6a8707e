"""DeepSeek-V3 (MLA attention, dense and mixture-of-experts MLPs) <-> protoformer's
`mla_layer_spec` / `mla_moe_layer_specs` model.

Config: `qk_nope_head_dim` -> `qk_head_dim`, `qk_rope_head_dim` -> `qk_pos_emb_head_dim`,
`v_head_dim`, `q_lora_rank` (None: queries projected directly), `kv_lora_rank`; rotary
`default` -> `rope_type="rope"`, `yarn` -> `"yarn"` with its factor, betas and mscales.
Layers from `first_k_dense_replace` on have routed and shared experts when
`n_routed_experts` is set; their routing and weights are read by `deepseek_v3_moe`.

Weights keep their shapes (DeepSeek's projections are protoformer's MLA slots under other
names); only the rotary rows are reordered when the checkpoint says `rope_interleave=false`
(rotate-half layout), since protoformer's MLA rotates interleaved pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

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
    model_rules,
    read_rope,
    same,
)
from protoformer.architectures.deepseek_v3_moe import (
    DEEPSEEK_MOE_FIELDS,
    deepseek_mlp_layer_rules,
    deepseek_moe_config_values,
    deepseek_moe_fields,
)
from protoformer.architectures.moe_conversion import with_moe
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.recipes.mla import mla_layer_spec
from protoformer.recipes.moe import mla_moe_layer_specs
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.yarn import yarn_get_mscale

__all__ = [
    "DeepseekV3Architecture",
    "export_deepseek_config",
    "mla_attention_rules",
    "parse_deepseek_config",
    "rope_rows_to_halves",
    "rope_rows_to_pairs",
]

_HF_CLASS = "DeepseekV3ForCausalLM"
_WHERE = f"{_HF_CLASS} config"


# ------------------------------------------------------------------ rotary row layouts
def rope_rows_to_pairs(w: Tensor, *, rows_per_head: int, rope_dim: int) -> Tensor:
    """Per head, reorder the last `rope_dim` rows from halves `[x.. | y..]` to pairs `(x0, y0), ...`."""
    rest = tuple(w.shape[1:])
    heads = w.shape[0] // rows_per_head
    w = w.reshape(heads, rows_per_head, *rest)  # [heads, rows, ...]
    kept, rope = w[:, : rows_per_head - rope_dim], w[:, rows_per_head - rope_dim:]
    first, second = rope[:, : rope_dim // 2], rope[:, rope_dim // 2:]  # [heads, rope / 2, ...]
    pairs = torch.stack((first, second), dim=2).reshape(heads, rope_dim, *rest)  # [heads, rope, ...]
    return torch.cat((kept, pairs), dim=1).reshape(heads * rows_per_head, *rest)


def rope_rows_to_halves(w: Tensor, *, rows_per_head: int, rope_dim: int) -> Tensor:
    """The inverse of `rope_rows_to_pairs`."""
    rest = tuple(w.shape[1:])
    heads = w.shape[0] // rows_per_head
    w = w.reshape(heads, rows_per_head, *rest)  # [heads, rows, ...]
    kept, rope = w[:, : rows_per_head - rope_dim], w[:, rows_per_head - rope_dim:]
    halves = torch.cat((rope[:, 0::2], rope[:, 1::2]), dim=1)  # [heads, rope, ...]
    return torch.cat((kept, halves), dim=1).reshape(heads * rows_per_head, *rest)


def _rotary_rule(ours: str, theirs: str, *, interleaved: bool, rows_per_head: int,
                 rope_dim: int) -> TensorRule:
    if interleaved:
        return same(ours, theirs)
    return TensorRule(
        ours, (theirs,),
        lambda parts: rope_rows_to_pairs(parts[0], rows_per_head=rows_per_head, rope_dim=rope_dim),
        lambda w: (rope_rows_to_halves(w, rows_per_head=rows_per_head, rope_dim=rope_dim),))


def mla_attention_rules(info: HFModelInfo, ours: str, theirs: str) -> list[TensorRule]:
    """Multi-latent attention of one layer, DeepSeek's names -> protoformer's slots."""
    config = info.config
    assert isinstance(config, MLATransformerConfig)  # parse_deepseek_config made it
    rope = config.qk_pos_emb_head_dim
    interleaved = info.rope_interleave
    rules: list[TensorRule] = []
    if config.q_lora_rank is None:
        rules.append(_rotary_rule(f"{ours}.linear_q_proj.weight", f"{theirs}.q_proj.weight",
                                  interleaved=interleaved, rows_per_head=config.q_head_dim,
                                  rope_dim=rope))
    else:
        rules.append(same(f"{ours}.linear_q_down_proj.weight", f"{theirs}.q_a_proj.weight"))
        rules.append(same(f"{ours}.q_layernorm.weight", f"{theirs}.q_a_layernorm.weight"))
        rules.append(_rotary_rule(f"{ours}.linear_q_up_proj.weight", f"{theirs}.q_b_proj.weight",
                                  interleaved=interleaved, rows_per_head=config.q_head_dim,
                                  rope_dim=rope))
    # kv_a_proj_with_mqa rows: [the latent c_kv | the rotary key part shared by all heads].
    rules.append(_rotary_rule(f"{ours}.linear_kv_down_proj.weight",
                              f"{theirs}.kv_a_proj_with_mqa.weight", interleaved=interleaved,
                              rows_per_head=config.kv_lora_rank + rope, rope_dim=rope))
    rules.append(same(f"{ours}.kv_layernorm.weight", f"{theirs}.kv_a_layernorm.weight"))
    rules.append(same(f"{ours}.linear_kv_up_proj.weight", f"{theirs}.kv_b_proj.weight"))
    rules.append(same(f"{ours}.linear_proj.weight", f"{theirs}.o_proj.weight"))
    return rules


# ------------------------------------------------------------------ config: HF -> protoformer
def _solve_mscale(attention_factor: float, factor: float, mscale_all_dim: float) -> float:
    """The `mscale` for which protoformer's cos/sin magnitude equals `attention_factor`.

    protoformer scales cos/sin by `m(factor, mscale) / m(factor, mscale_all_dim)` with
    `m(s, k) = 0.1 k ln s + 1`; Hugging Face may state the factor directly.
    """
    if factor <= 1.0:
        if abs(attention_factor - 1.0) > 1e-12:
            raise UnsupportedHFModelError(
                f"{_WHERE}: yarn attention_factor={attention_factor} with factor={factor} <= 1 "
                "cannot be represented (protoformer's YaRN magnitude is 1 there)")
        return 1.0
    mscale = (attention_factor * yarn_get_mscale(factor, mscale_all_dim) - 1.0) / (0.1 * math.log(factor))
    if mscale < 0.0:
        raise UnsupportedHFModelError(
            f"{_WHERE}: yarn attention_factor={attention_factor} is below 1 / "
            f"mscale(factor={factor}, mscale_all_dim={mscale_all_dim}); not representable")
    return mscale


def _yarn_fields(rope: ConfigReader, max_positions: int) -> dict[str, float]:
    original = rope.get_int("original_max_position_embeddings", max_positions)
    factor = (rope.get_float("factor") if rope.present("factor")
              else max_positions / original)
    if not rope.get_bool("truncate", True):
        raise UnsupportedHFModelError(f"{_WHERE}: yarn with truncate=false is not supported; "
                                      "protoformer rounds the correction range as DeepSeek does")
    mscale = rope.get_float("mscale", 0.0)
    mscale_all_dim = rope.get_float("mscale_all_dim", 0.0)
    if rope.present("attention_factor"):
        mscale = _solve_mscale(rope.get_float("attention_factor"), factor, mscale_all_dim)
    elif not (mscale and mscale_all_dim):
        # Hugging Face then uses m(factor, 1) for cos/sin, whatever mscale says.
        mscale = _solve_mscale(yarn_get_mscale(factor, 1.0), factor, mscale_all_dim)
    return {
        "rotary_scaling_factor": factor,
        "original_max_position_embeddings": float(original),
        "beta_fast": rope.get_float("beta_fast", 32.0) or 32.0,
        "beta_slow": rope.get_float("beta_slow", 1.0) or 1.0,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }


def parse_deepseek_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """A DeepSeek-V3 config.json mapping -> `HFModelInfo`."""
    reader = ConfigReader(values, _WHERE)
    num_layers = reader.get_int("num_hidden_layers")
    experts = deepseek_moe_fields(values, _WHERE)
    if reader.get_bool("attention_bias", False):
        raise UnsupportedHFModelError(
            f"{_WHERE}: attention_bias=true puts a bias on o_proj but not on the MLP, which "
            "protoformer's add_bias_linear cannot represent")
    hidden = reader.get_int("hidden_size")
    heads = reader.get_int("num_attention_heads")
    max_positions = reader.get_int("max_position_embeddings")
    rope_type, theta, rope = read_rope(reader)
    if rope_type == "yarn":
        yarn = _yarn_fields(rope, max_positions)
    elif rope_type == "default":
        yarn = {}
    else:
        raise UnsupportedHFModelError(f"{_WHERE}: rope_type={rope_type!r} is not supported; "
                                      "protoformer's MLA maps 'default' and 'yarn'")
    nope_dim, rope_dim = reader.get_int("qk_nope_head_dim"), reader.get_int("qk_rope_head_dim")
    config = checked_config(reader, lambda: MLATransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        # Unused by MLA; set only where hidden / heads would not divide.
        kv_channels=None if hidden % heads == 0 else nope_dim + rope_dim,
        ffn_hidden_size=reader.get_int("intermediate_size"),
        q_lora_rank=reader.get_optional_int("q_lora_rank"),
        kv_lora_rank=reader.get_int("kv_lora_rank"),
        qk_head_dim=nope_dim,
        qk_pos_emb_head_dim=rope_dim,
        v_head_dim=reader.get_int("v_head_dim"),
        normalization="RMSNorm",
        layernorm_epsilon=reader.get_float("rms_norm_eps", 1e-6),
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=activation_for(reader),
        init_method_std=reader.get_float("initializer_range", 0.02),
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_dropout=reader.get_float("attention_dropout", 0.0),
        hidden_dropout=0.0,
        rotary_base=theta,
        rope_type="yarn" if yarn else "rope",
        rotary_scaling_factor=yarn.get("rotary_scaling_factor", 40.0),
        original_max_position_embeddings=int(yarn.get("original_max_position_embeddings", 4096)),
        beta_fast=yarn.get("beta_fast", 32.0),
        beta_slow=yarn.get("beta_slow", 1.0),
        mscale=yarn.get("mscale", 1.0),
        mscale_all_dim=yarn.get("mscale_all_dim", 0.0),
    ))
    if experts is not None:
        config = with_moe(config, experts, _WHERE)
    extra = reader.get_optional_int("num_nextn_predict_layers")
    if extra is None:
        extra = reader.get_int("num_mtp_layers", 0)
    names: tuple[str, ...] = (*DESCRIBED_FIELDS, "q_lora_rank", "kv_lora_rank", "qk_head_dim",
             "qk_pos_emb_head_dim", "v_head_dim", "rope_type")
    if experts is not None:
        names += DEEPSEEK_MOE_FIELDS
    if config.rope_type == "yarn":
        names += ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast",
                  "beta_slow", "mscale", "mscale_all_dim")
    return hf_model_info(reader, config, model_type="deepseek_v3", architecture=_HF_CLASS,
                         max_sequence_length=max_positions,
                         rope_interleave=reader.get_bool("rope_interleave", True),
                         extra_layers=extra, described_fields=names)


# ------------------------------------------------------------------ config: protoformer -> HF
def _rope_parameters(config: MLATransformerConfig) -> JSONDict:
    if config.rope_type == "rope":
        return {"rope_type": "default", "rope_theta": config.rotary_base}
    factor, mscale, all_dim = config.rotary_scaling_factor, config.mscale, config.mscale_all_dim
    rope: JSONDict = {
        "rope_type": "yarn",
        "rope_theta": config.rotary_base,
        "factor": factor,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "beta_fast": config.beta_fast,
        "beta_slow": config.beta_slow,
        "mscale": mscale,
        "mscale_all_dim": all_dim,
    }
    ours = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, all_dim)
    inferred = ours if (mscale and all_dim) else yarn_get_mscale(factor, 1.0)
    if ours != inferred:  # Hugging Face would infer another cos/sin magnitude: state ours
        rope["attention_factor"] = ours
    return rope


def export_deepseek_config(config: TransformerConfig, *, vocab_size: int,
                           max_sequence_length: int, tie_word_embeddings: bool) -> JSONDict:
    """A DeepSeek-V3 config.json mapping for a protoformer MLA model (dense or with experts)."""
    if not isinstance(config, MLATransformerConfig):
        raise UnsupportedHFModelError("only an MLATransformerConfig model exports as DeepSeek-V3")
    problems: list[str] = []
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r} (DeepSeek uses RMSNorm)")
    if not config.gated_linear_unit:
        problems.append("gated_linear_unit=False (DeepSeek's MLP is gated)")
    if config.add_bias_linear or config.add_qkv_bias:
        problems.append("biases (DeepSeek's attention_bias would not bias the MLP)")
    if config.softmax_scale is not None:
        problems.append(f"softmax_scale={config.softmax_scale} (DeepSeek derives it)")
    if problems:
        raise UnsupportedHFModelError("cannot export this model as DeepseekV3ForCausalLM: "
                                      + "; ".join(problems))
    experts = None if config.num_moe_experts is None else deepseek_moe_config_values(config)
    rope = _rope_parameters(config)
    legacy = None if config.rope_type == "rope" else {k: v for k, v in rope.items()
                                                      if k != "rope_theta"}
    values: JSONDict = {
        "architectures": [_HF_CLASS],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_head_dim,
        "qk_rope_head_dim": config.qk_pos_emb_head_dim,
        "v_head_dim": config.v_head_dim,
        "hidden_act": activation_name(config),
        "max_position_embeddings": max_sequence_length,
        "rms_norm_eps": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "attention_dropout": config.attention_dropout,
        "attention_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rotary_base,
        "rope_scaling": legacy,
        "rope_interleave": True,
        # Every layer dense, unless the routed-expert keys below (`experts`) say otherwise.
        "first_k_dense_replace": config.num_layers,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
    }
    values.update(experts or {})
    return values


# ------------------------------------------------------------------ the registered architecture
class DeepseekV3Architecture:
    """DeepSeek-V3 (`CausalLMArchitecture`): multi-latent attention, dense MLPs
    (`mla_layer_spec`) or dense-then-MoE layers (`mla_moe_layer_specs`)."""

    model_type = "deepseek_v3"
    hf_class = _HF_CLASS
    exports_by_default = True

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_deepseek_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        if info.config.num_moe_experts is None:
            return mla_layer_spec(backend, info.config)
        return mla_moe_layer_specs(backend, info.config)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return model_rules(info, mla_attention_rules, deepseek_mlp_layer_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_deepseek_config(config, vocab_size=sizes.vocab_size,
                                      max_sequence_length=sizes.max_sequence_length,
                                      tie_word_embeddings=sizes.tie_word_embeddings)


register_architecture(DeepseekV3Architecture())


def _deepseek_v3_mla() -> TransformerConfig:
    # DeepSeek-V3's attention and sizes with a dense SwiGLU MLP in every layer (the released
    # model uses mixture-of-experts MLPs in all but its first three layers).
    return MLATransformerConfig(
        num_layers=61,
        hidden_size=7168,
        num_attention_heads=128,
        ffn_hidden_size=18432,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        rotary_base=10000.0,
        rope_type="yarn",
        rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        params_dtype=torch.bfloat16,
        bf16=True,
    )


register_preset(Preset(
    "deepseek-v3-mla", "DeepSeek-V3 attention shapes (61 layers, hidden 7168, MLA with 128 "
    "heads, YaRN RoPE) with dense SwiGLU MLPs of 18432", _deepseek_v3_mla, vocab_size=129280,
    max_sequence_length=163840, layer_spec=mla_layer_spec, tie_embeddings=False))
