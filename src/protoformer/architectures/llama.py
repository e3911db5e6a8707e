"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) <-> protoformer's `gpt_layer_spec` model.

Config: sizes map one to one (`num_key_value_heads` -> `num_query_groups`, `head_dim` ->
`kv_channels`, `intermediate_size` -> `ffn_hidden_size`); RMSNorm, SwiGLU (or the gated
`hidden_act`), RoPE with `rope_theta` and optionally Llama-3 frequency scaling; Qwen3's per-head
`q_norm`/`k_norm` become `qk_layernorm`. Biases: Qwen2's q/k/v bias is `add_qkv_bias`;
`add_bias_linear` puts a bias on o_proj *and* the MLP, so it covers Llama's
`attention_bias=mlp_bias=True` only.

Weights: q/k/v are fused into `linear_qkv` in Megatron-Core's grouped layout (per key/value
group: its query heads, its key head, its value head; see `protoformer.transformer.attention`);
gate/up into `linear_fc1` (gate rows first); the rest keep their shape under new names.
"""

from __future__ import annotations

import dataclasses
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
    model_rules,
    owned,
    read_rope,
    same,
)
from protoformer.architectures.decoder_config import (
    decoder_config_values,
    read_decoder_config,
    read_head_dim,
)
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import RopeScaling, TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs

__all__ = [
    "DENSE_MODEL_TYPES",
    "LlamaArchitecture",
    "dense_attention_rules",
    "dense_layer_specs",
    "export_dense_config",
    "fuse_qkv",
    "layer_windows",
    "parse_dense_config",
    "qkv_rule",
    "split_qkv",
]

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# ------------------------------------------------------------------ fused QKV layout
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, *, heads: int, groups: int, head_dim: int) -> Tensor:
    """Hugging Face q/k/v projections (weights `[n * hn, h]` or biases `[n * hn]`) -> grouped `linear_qkv`.

    Query head `i` belongs to key/value group `i // (heads / groups)`, as in Hugging Face's
    `repeat_kv`; each group's rows are `[its query heads | its key head | its value head]`.
    """
    per_group = heads // groups
    rest = tuple(q.shape[1:])  # (h,) for a weight, () for a bias
    q = q.reshape(groups, per_group * head_dim, *rest)  # [ng, np/ng * hn, ...]
    k = k.reshape(groups, head_dim, *rest)  # [ng, hn, ...]
    v = v.reshape(groups, head_dim, *rest)  # [ng, hn, ...]
    fused = torch.cat((q, k, v), dim=1)  # [ng, (np/ng + 2) * hn, ...]
    return fused.reshape(groups * (per_group + 2) * head_dim, *rest)


def split_qkv(fused: Tensor, *, heads: int, groups: int,
              head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `fuse_qkv`: grouped `linear_qkv` rows -> (q, k, v), each with its own storage."""
    per_group = heads // groups
    rest = tuple(fused.shape[1:])
    grouped = fused.reshape(groups, (per_group + 2) * head_dim, *rest)  # [ng, (np/ng + 2) * hn, ...]
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (owned(q.reshape(heads * head_dim, *rest)),  # [np * hn, ...]
            owned(k.reshape(groups * head_dim, *rest)),  # [ng * hn, ...]
            owned(v.reshape(groups * head_dim, *rest)))


def qkv_rule(ours: str, theirs: str, kind: str, config: TransformerConfig, *,
             projections: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")) -> TensorRule:
    """`{ours}.linear_qkv.{kind}` from the three `{theirs}.{projection}.{kind}` tensors."""
    heads, groups, head_dim = config.num_attention_heads, config.query_groups, config.head_dim

    def to_ours(parts: Sequence[Tensor]) -> Tensor:
        q, k, v = parts
        return fuse_qkv(q, k, v, heads=heads, groups=groups, head_dim=head_dim)

    def to_theirs(fused: Tensor) -> tuple[Tensor, ...]:
        return split_qkv(fused, heads=heads, groups=groups, head_dim=head_dim)

    names = tuple(f"{theirs}.{proj}.{kind}" for proj in projections)
    return TensorRule(f"{ours}.linear_qkv.{kind}", names, to_ours, to_theirs)


def dense_attention_rules(info: HFModelInfo, ours: str, theirs: str) -> list[TensorRule]:
    """Self-attention of one layer: `linear_qkv` (+ bias), q/k norms, `linear_proj` (+ bias)."""
    config = info.config
    rules = [qkv_rule(ours, theirs, "weight", config)]
    if config.add_bias_linear or config.add_qkv_bias:
        rules.append(qkv_rule(ours, theirs, "bias", config))
    if config.qk_layernorm:
        rules.append(same(f"{ours}.q_layernorm.weight", f"{theirs}.q_norm.weight"))
        rules.append(same(f"{ours}.k_layernorm.weight", f"{theirs}.k_norm.weight"))
    rules.append(same(f"{ours}.linear_proj.weight", f"{theirs}.o_proj.weight"))
    if config.add_bias_linear:
        rules.append(same(f"{ours}.linear_proj.bias", f"{theirs}.o_proj.bias"))
    return rules


# ------------------------------------------------------------------ config: HF -> protoformer
def _biases(model_type: str, reader: ConfigReader) -> tuple[bool, bool]:
    """(`add_bias_linear`, `add_qkv_bias`) for the checkpoint's biases, or an error if inexpressible."""
    if model_type == "llama":
        attention = reader.get_bool("attention_bias", False)
        qkv, o_proj, mlp = attention, attention, reader.get_bool("mlp_bias", False)
    elif model_type == "qwen3":
        attention = reader.get_bool("attention_bias", False)
        qkv, o_proj, mlp = attention, attention, False
    elif model_type == "qwen2":
        qkv, o_proj, mlp = True, False, False
    else:  # mistral
        qkv, o_proj, mlp = False, False, False
    if o_proj != mlp:
        raise UnsupportedHFModelError(
            f"{reader.where}: this checkpoint has biases on q/k/v={qkv}, o_proj={o_proj}, "
            f"MLP={mlp}; protoformer's add_bias_linear puts a bias on o_proj and on the MLP "
            "together, so a bias on only one of them cannot be represented")
    return o_proj, qkv


def layer_windows(values: Mapping[str, object], model_type: str) -> tuple[int | None, ...]:
    """Each layer's sliding attention window (None: the layer sees every earlier position).

    Mistral slides every layer by `sliding_window`; Qwen2/Qwen3 with `use_sliding_window`
    slide the layers `layer_types` marks `sliding_attention` (else those from
    `max_window_layers` on). A window at least `max_position_embeddings` long blocks nothing
    and is dropped.
    """
    reader = ConfigReader(values, f"{_HF_CLASSES[model_type]} config")
    num_layers = reader.get_int("num_hidden_layers")
    full: tuple[int | None, ...] = (None,) * num_layers
    window = reader.get_optional_int("sliding_window")
    if model_type in ("qwen2", "qwen3") and not reader.get_bool("use_sliding_window", False):
        window = None
    if model_type == "llama" or window is None or window >= reader.get_int("max_position_embeddings"):
        return full
    if window < 1:
        raise HFConversionError(f"{reader.where}: sliding_window={window} must be >= 1 or null")
    if model_type == "mistral":
        return (window,) * num_layers
    layer_types = reader.get_layer_types(num_layers)
    if layer_types is None:
        first = reader.get_int("max_window_layers", num_layers)
        return tuple(window if index >= first else None for index in range(num_layers))
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def dense_layer_specs(backend: BackendSpecProvider, config: TransformerConfig,
                      windows: Sequence[int | None]) -> LayerSpecs:
    """`gpt_layer_spec` for every layer, with each layer's sliding window: one spec when all
    layers agree, else one per layer."""
    if len(set(windows)) <= 1:
        return gpt_layer_spec(backend, config, window_size=windows[0] if windows else None)
    return [gpt_layer_spec(backend, config, window_size=window) for window in windows]


def parse_dense_config(values: Mapping[str, object], model_type: str,
                       dtype: torch.dtype) -> HFModelInfo:
    """A Llama/Mistral/Qwen2/Qwen3 config.json mapping -> `HFModelInfo` (parameters in `dtype`).

    Sliding attention windows (Mistral, Qwen with `use_sliding_window`) are read by
    `layer_windows` when the layer specs are made.
    """
    reader = ConfigReader(values, f"{_HF_CLASSES[model_type]} config")
    head_dim = read_head_dim(reader)
    max_positions = reader.get_int("max_position_embeddings")
    rope_type, theta, rope = read_rope(reader)
    # Frequency scaling; the values a rope type does not use keep TransformerConfig's defaults.
    scaling: RopeScaling | None = None
    factor, low_freq, high_freq, original = 8.0, 1.0, 4.0, 8192
    max_sequence_length = max_positions
    if rope_type == "llama3":
        scaling = "llama3"
        factor = rope.get_float("factor")
        low_freq = rope.get_float("low_freq_factor")
        high_freq = rope.get_float("high_freq_factor")
        original = rope.get_int("original_max_position_embeddings", max_positions)
    elif rope_type == "linear":
        scaling, factor = "linear", rope.get_float("factor")
    elif rope_type == "dynamic":
        # Dynamic NTK stretches the trained length `max_position_embeddings` by up to `factor`.
        scaling, factor, original = "dynamic", rope.get_float("factor"), max_positions
        max_sequence_length = int(max_positions * factor)
    elif rope_type != "default":
        raise UnsupportedHFModelError(
            f"{reader.where}: rope_type={rope_type!r} is not supported; protoformer maps "
            "'default', 'llama3', 'linear' and 'dynamic'")
    add_bias_linear, add_qkv_bias = _biases(model_type, reader)
    base = read_decoder_config(reader, dtype, head_dim=head_dim, rotary_base=theta)
    config = checked_config(reader, lambda: dataclasses.replace(
        base,
        qk_layernorm=model_type == "qwen3",
        add_bias_linear=add_bias_linear,
        add_qkv_bias=add_qkv_bias,
        rope_scaling=scaling,
        rope_scaling_factor=factor,
        rope_low_freq_factor=low_freq,
        rope_high_freq_factor=high_freq,
        rope_original_max_position_embeddings=original,
    ))
    layer_windows(values, model_type)  # a malformed window setting fails here, with the config
    return hf_model_info(reader, config, model_type=model_type,
                         architecture=_HF_CLASSES[model_type],
                         max_sequence_length=max_sequence_length,
                         described_fields=_described_fields(config))


def _described_fields(config: TransformerConfig) -> tuple[str, ...]:
    names: tuple[str, ...] = (*DESCRIBED_FIELDS, "num_query_groups", "kv_channels", "rope_scaling")
    if config.rope_scaling == "llama3":
        names += ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_position_embeddings")
    elif config.rope_scaling == "linear":
        names += ("rope_scaling_factor",)
    elif config.rope_scaling == "dynamic":
        names += ("rope_scaling_factor", "rope_original_max_position_embeddings")
    return names


# ------------------------------------------------------------------ config: protoformer -> HF
def _choose_dense_type(config: TransformerConfig) -> str:
    if config.qk_layernorm:
        return "qwen3"
    if config.add_qkv_bias and not config.add_bias_linear:
        return "qwen2"
    return "llama"


def _gemma_only_problems(config: TransformerConfig, family: str) -> list[str]:
    """The Gemma-only config options `config` sets, each as a reason `family` cannot export it
    (a config.json without them would load as a different model)."""
    problems: list[str] = []
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(config, name)
        if value is not None:
            problems.append(f"{name}={value} ({family} do not soft-cap; Gemma 2 does)")
    if config.embedding_multiplier != 1.0:
        problems.append(f"embedding_multiplier={config.embedding_multiplier} ({family} do not "
                        "scale the embeddings; Gemma does)")
    if config.layernorm_zero_centered_gamma:
        problems.append(f"layernorm_zero_centered_gamma=True ({family} scale by the norm weight "
                        "itself; Gemma by 1 + weight)")
    return problems


def _check_exportable(config: TransformerConfig, model_type: str) -> None:
    problems: list[str] = []
    if type(config) is not TransformerConfig:
        problems.append(f"a {type(config).__name__} (these models take a plain TransformerConfig)")
    if config.num_moe_experts is not None:
        problems.append(f"num_moe_experts={config.num_moe_experts} (these models are dense; "
                        "mixture-of-experts models export as Mixtral, Qwen2-MoE, Qwen3-MoE, "
                        "OLMoE or DeepSeek-V3)")
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r} (these models use RMSNorm)")
    if not config.gated_linear_unit:
        problems.append("gated_linear_unit=False (these models use a gated MLP)")
    if config.rotary_percent != 1.0:
        problems.append(f"rotary_percent={config.rotary_percent} (whole heads rotate)")
    if config.rotary_interleaved:
        problems.append("rotary_interleaved=True (these models rotate halves)")
    if config.softmax_scale is not None:
        problems.append(f"softmax_scale={config.softmax_scale} (they use 1/sqrt(head_dim))")
    problems.extend(_gemma_only_problems(config, "these models"))
    qkv_bias = config.add_bias_linear or config.add_qkv_bias
    wants_qk_norm = model_type == "qwen3"
    if config.qk_layernorm != wants_qk_norm:
        problems.append(f"qk_layernorm={config.qk_layernorm} ({model_type} "
                        f"{'has' if wants_qk_norm else 'has no'} q/k norms)")
    if model_type == "llama" and qkv_bias != config.add_bias_linear:
        problems.append("a q/k/v bias without add_bias_linear (Llama's attention_bias also "
                        "covers o_proj; use model_type='qwen2')")
    if model_type == "mistral" and qkv_bias:
        problems.append("biases (Mistral has none)")
    if model_type == "qwen2" and (config.add_bias_linear or not config.add_qkv_bias):
        problems.append("Qwen2 has a q/k/v bias and no other: add_qkv_bias=True, "
                        "add_bias_linear=False")
    if model_type == "qwen3" and qkv_bias:
        problems.append("biases (Qwen3's attention_bias would also bias o_proj, not the MLP)")
    if problems:
        raise UnsupportedHFModelError(
            f"cannot export this model as {_HF_CLASSES[model_type]}: "
            + "; ".join(problems))


def export_dense_config(config: TransformerConfig, *, vocab_size: int, max_sequence_length: int,
                        tie_word_embeddings: bool, model_type: str | None = None) -> JSONDict:
    """A config.json mapping for a Llama-family model equal to a protoformer `gpt_layer_spec` model.

    `model_type=None` picks Qwen3 for per-head q/k norms, Qwen2 for a q/k/v-only bias and
    Llama otherwise. Rotary settings are written both as transformers 5 `rope_parameters` and
    as the older `rope_theta`/`rope_scaling` keys, so either major version reads them.
    """
    kind = model_type if model_type is not None else _choose_dense_type(config)
    if kind not in DENSE_MODEL_TYPES:
        raise UnsupportedHFModelError(f"model_type={kind!r}: a dense protoformer model exports as "
                                      f"one of {', '.join(DENSE_MODEL_TYPES)}")
    _check_exportable(config, kind)
    rope: JSONDict = {"rope_type": "default", "rope_theta": config.rotary_base}
    legacy_scaling: JSONDict | None = None
    max_positions = max_sequence_length
    if config.rope_scaling == "llama3":
        legacy_scaling = {
            "rope_type": "llama3",
            "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_position_embeddings,
        }
    elif config.rope_scaling is not None:
        legacy_scaling = {"rope_type": config.rope_scaling, "factor": config.rope_scaling_factor}
        if config.rope_scaling == "dynamic":  # transformers scales from max_position_embeddings
            max_positions = config.rope_original_max_position_embeddings
    if legacy_scaling is not None:
        rope = {**legacy_scaling, "rope_theta": config.rotary_base}
    values = decoder_config_values(
        config, ModelSizes(vocab_size, max_positions, tie_word_embeddings), model_type=kind,
        hf_class=_HF_CLASSES[kind])
    values.update({
        "intermediate_size": config.ffn_size,
        "hidden_act": activation_name(config),
        "rope_parameters": rope,
        "rope_theta": config.rotary_base,
        "rope_scaling": legacy_scaling,
    })
    if kind == "llama":
        values["attention_bias"] = config.add_bias_linear
        values["mlp_bias"] = config.add_bias_linear
    elif kind == "qwen3":
        values["attention_bias"] = False
    if kind == "mistral":
        values["sliding_window"] = None
    elif kind in ("qwen2", "qwen3"):
        values["use_sliding_window"] = False
        values["sliding_window"] = None
        values["max_window_layers"] = config.num_layers
    return values


# ------------------------------------------------------------------ the registered architectures
@dataclass(frozen=True)
class LlamaArchitecture:
    """One of the Llama-family `model_type`s (a `CausalLMArchitecture`): all are built by
    `gpt_layer_spec` and differ in biases, q/k norms and sliding windows."""

    model_type: str
    exports_by_default: bool = True

    @property
    def hf_class(self) -> str:
        return _HF_CLASSES[self.model_type]

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_dense_config(values, self.model_type, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        return dense_layer_specs(backend, info.config, layer_windows(info.hf_config,
                                                                     self.model_type))

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return model_rules(info, dense_attention_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_dense_config(config, vocab_size=sizes.vocab_size,
                                   max_sequence_length=sizes.max_sequence_length,
                                   tie_word_embeddings=sizes.tie_word_embeddings,
                                   model_type=self.model_type)


# Mistral writes the same layout as Llama without biases: a model not read from Hugging Face
# exports as Llama (or Qwen2/Qwen3 for their biases and norms), never as Mistral.
for _kind in DENSE_MODEL_TYPES:
    register_architecture(LlamaArchitecture(_kind, exports_by_default=_kind != "mistral"))


# ------------------------------------------------------------------ presets of published sizes
def _llama3(*, num_layers: int, hidden_size: int, num_attention_heads: int,
            ffn_hidden_size: int) -> TransformerConfig:
    # Llama 3.1 shapes: GQA with 8 key/value heads, SwiGLU, RMSNorm, no biases, RoPE with
    # base 500000 and the llama3 frequency scaling (factor 8 over an 8192-token original).
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=8,
        ffn_hidden_size=ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        rotary_base=500000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position_embeddings=8192,
        params_dtype=torch.bfloat16,
        bf16=True,
    )


def _llama3_8b() -> TransformerConfig:
    return _llama3(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=14336)


def _llama3_70b() -> TransformerConfig:
    return _llama3(num_layers=80, hidden_size=8192, num_attention_heads=64, ffn_hidden_size=28672)


register_preset(Preset(
    "llama3-8b", "Llama 3.1 8B shapes (32 layers, hidden 4096, GQA 32/8, SwiGLU 14336, vocab "
    "128256, llama3 RoPE scaling)", _llama3_8b, vocab_size=128256, max_sequence_length=131072,
    layer_spec=gpt_layer_spec, tie_embeddings=False))
register_preset(Preset(
    "llama3-70b", "Llama 3.1 70B shapes (80 layers, hidden 8192, GQA 64/8, SwiGLU 28672, vocab "
    "128256, llama3 RoPE scaling)", _llama3_70b, vocab_size=128256, max_sequence_length=131072,
    layer_spec=gpt_layer_spec, tie_embeddings=False))
