"""Gemma 2 decoders <-> protoformer layers with sandwich norms, soft-capping and sliding windows.

Gemma 2 is Gemma (`architectures.gemma`: embeddings scaled by `sqrt(hidden_size)`, `(1 + w)`
RMSNorm, gated tanh-GeLU MLP, `head_dim` independent of the hidden size) plus:

- sandwich norms: each branch's output is normalized before the residual add
  (`post_self_attn_layernorm` / `post_mlp_layernorm` slots, checkpoint names
  `post_attention_layernorm` / `post_feedforward_layernorm`; the pre-MLP norm is the
  checkpoint's `pre_feedforward_layernorm`);
- alternating sliding-window and global layers (`layer_types`, default: even layers slide by
  `sliding_window`), one layer spec per layer;
- attention-logit soft-capping (`config.attn_logit_softcapping`) and final-logit
  soft-capping (`config.final_logit_softcapping`);
- the softmax scale `query_pre_attn_scalar ** -0.5` (`config.softmax_scale`).

`gemma2_layer_spec` is shared with Gemma 3 (`architectures.gemma3`), which adds per-head
q/k norms and a rotary base of its own for the sliding layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import torch

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
    mlp_rules,
    same,
)
from protoformer.architectures.decoder_config import (
    require_default_rope,
)
from protoformer.architectures.gemma import (
    gemma_config,
    gemma_config_values,
    gemma_exportable_problems,
    refuse_gemma_options,
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import mlp_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP, gelu_tanh

__all__ = [
    "GEMMA2_DESCRIBED_FIELDS",
    "Gemma2Architecture",
    "gemma2_config_values",
    "gemma2_layer_spec",
    "gemma2_layer_specs",
    "gemma_family_config",
    "gemma_windows",
    "sandwich_rules",
]

_HF_CLASS = "Gemma2ForCausalLM"

GEMMA2_DESCRIBED_FIELDS: tuple[str, ...] = (
    *DESCRIBED_FIELDS, "num_query_groups", "kv_channels", "layernorm_zero_centered_gamma",
    "embedding_multiplier", "attn_logit_softcapping", "final_logit_softcapping")


# ------------------------------------------------------------------ the layer recipe
def gemma2_layer_spec(backend: BackendSpecProvider, config: TransformerConfig, *,
                      window_size: int | None = None,
                      rotary_base: float | None = None) -> TransformerLayerSubmodules:
    """A Gemma 2/3 layer: pre- and post-norms around both branches (four norms of the
    config's kind), causal self-attention (per-head q/k norms with `config.qk_layernorm`),
    an MLP. `window_size` makes it a sliding layer; `rotary_base` gives its attention a
    rotary base of its own (Gemma 3's local layers)."""
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm")
    qk_norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=True) \
        if config.qk_layernorm else None
    attention = SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=qk_norm,
        k_layernorm=qk_norm,
    )
    return TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=functools.partial(
            SelfAttention, submodules=attention, attn_mask_type=AttnMaskType.padding_causal,
            window_size=window_size, rotary_base=rotary_base),
        post_self_attn_layernorm=norm,
        pre_mlp_layernorm=norm,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
        post_mlp_layernorm=norm,
    )


def gemma2_layer_specs(backend: BackendSpecProvider, config: TransformerConfig,
                       windows: Sequence[int | None], *,
                       local_rotary_base: float | None = None) -> LayerSpecs:
    """One `gemma2_layer_spec` per layer: layer `i` slides by `windows[i]` (None: global);
    with `local_rotary_base` the sliding layers rotate with that base."""
    if len(windows) != config.num_layers:
        raise ValueError(f"gemma2_layer_specs: {len(windows)} windows for "
                         f"{config.num_layers} layers; give one (or None) per layer")
    return [gemma2_layer_spec(backend, config, window_size=window,
                              rotary_base=local_rotary_base if window is not None else None)
            for window in windows]


def gemma_windows(reader: ConfigReader, num_layers: int, *,
                  pattern: int) -> tuple[int | None, ...]:
    """Each layer's window: `layer_types` if given, else every `pattern`-th layer global and
    the others sliding by `sliding_window` (transformers' default); None for a window at
    least `max_position_embeddings` long (it blocks nothing)."""
    window = reader.get_optional_int("sliding_window")
    kinds = reader.get_layer_types(num_layers)
    if kinds is None:
        kinds = ["full_attention" if (index + 1) % pattern == 0 else "sliding_attention"
                 for index in range(num_layers)]
    if window is None and "sliding_attention" in kinds:
        raise HFConversionError(f"{reader.where}: layer_types has sliding_attention layers "
                                "but sliding_window is null")
    if window is not None and window < 1:
        raise HFConversionError(f"{reader.where}: sliding_window={window} must be >= 1")
    if window is None or window >= reader.get_int("max_position_embeddings"):
        return (None,) * num_layers
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


# ------------------------------------------------------------------ config: HF -> protoformer
def gemma_family_config(reader: ConfigReader, dtype: torch.dtype, *, rotary_base: float,
                        qk_layernorm: bool, attn_softcap: float | None,
                        final_softcap: float | None) -> TransformerConfig:
    """The `TransformerConfig` of a Gemma 2/3 config.json: Gemma's (`gemma_config`) with
    q/k norms, the `query_pre_attn_scalar` score scale and the soft-caps."""
    scalar = reader.get_float("query_pre_attn_scalar", 256.0)
    if not scalar > 0.0:
        raise HFConversionError(f"{reader.where}: query_pre_attn_scalar={scalar} must be > 0")
    head_dim = reader.get_int("head_dim", 256)  # transformers' default for Gemma 2 and 3
    base = gemma_config(reader, dtype, head_dim=head_dim, rotary_base=rotary_base,
                        hidden_act=reader.get_str("hidden_activation", "gelu_pytorch_tanh"))
    return checked_config(reader, lambda: dataclasses.replace(
        base,
        qk_layernorm=qk_layernorm,
        softmax_scale=scalar ** -0.5,
        attn_logit_softcapping=attn_softcap,
        final_logit_softcapping=final_softcap,
    ))


def _optional_cap(reader: ConfigReader, key: str, default: float | None) -> float | None:
    if key not in reader.values:
        return default
    return reader.get_float(key) if reader.present(key) else None


def parse_gemma2_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """A Gemma 2 config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, f"{_HF_CLASS} config")
    refuse_gemma_options(reader)
    theta, _ = require_default_rope(reader, "gemma2")
    config = gemma_family_config(
        reader, dtype, rotary_base=theta, qk_layernorm=False,
        attn_softcap=_optional_cap(reader, "attn_logit_softcapping", 50.0),
        final_softcap=_optional_cap(reader, "final_logit_softcapping", 30.0))
    gemma_windows(reader, config.num_layers, pattern=2)  # a malformed window fails here
    return hf_model_info(reader, config, model_type="gemma2", architecture=_HF_CLASS,
                         tied_by_default=True, described_fields=GEMMA2_DESCRIBED_FIELDS)


# ------------------------------------------------------------------ config: protoformer -> HF
def gemma2_config_values(config: TransformerConfig, sizes: ModelSizes, *, model_type: str,
                         hf_class: str) -> JSONDict:
    """The config.json values Gemma 2 and 3 share: Gemma's (`gemma_config_values`), the
    activation under its Gemma 2 key, the score scale and the soft-caps."""
    scale = config.softmax_scale if config.softmax_scale is not None \
        else config.head_dim ** -0.5
    values = gemma_config_values(config, sizes, model_type=model_type, hf_class=hf_class)
    values.update({
        "hidden_activation": activation_name(config),
        "query_pre_attn_scalar": scale ** -2,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
    })
    return values


def export_gemma2_config(config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
    """A Gemma 2 config.json mapping: the default layer pattern (even layers slide by 4096)."""
    problems = gemma_exportable_problems(config, qk_layernorm=False)
    if config.rope_scaling is not None:
        problems.append("Gemma 2 has no rope scaling")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))
    values = gemma2_config_values(config, sizes, model_type="gemma2", hf_class=_HF_CLASS)
    values.update({
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "rope_theta": config.rotary_base,
        "sliding_window": 4096,
        "layer_types": ["sliding_attention" if index % 2 == 0 else "full_attention"
                        for index in range(config.num_layers)],
    })
    return values


# ------------------------------------------------------------------ tensors
def sandwich_rules(info: HFModelInfo,
                   attention_rules: Callable[[HFModelInfo, str, str], list[TensorRule]],
                   *, pre_norms: bool = True) -> list[TensorRule]:
    """Every tensor of a model with post-norms (Gemma 2/3, OLMo 2): embedding; per layer the
    pre-norms (unless `pre_norms` is False: OLMo 2 has none), attention, post-attention norm,
    MLP, post-MLP norm; final norm; head."""
    rules = [same("embedding.weight", "model.embed_tokens.weight")]
    for index in range(info.config.num_layers):
        ours, theirs = f"decoder.layers.{index}", f"model.layers.{index}"
        if pre_norms:
            rules.append(same(f"{ours}.input_layernorm.weight",
                              f"{theirs}.input_layernorm.weight"))
        rules.extend(attention_rules(info, f"{ours}.self_attention", f"{theirs}.self_attn"))
        rules.append(same(f"{ours}.post_self_attn_layernorm.weight",
                          f"{theirs}.post_attention_layernorm.weight"))
        if pre_norms:
            rules.append(same(f"{ours}.pre_mlp_layernorm.weight",
                              f"{theirs}.pre_feedforward_layernorm.weight"))
        rules.extend(mlp_rules(info.config, f"{ours}.mlp", f"{theirs}.mlp"))
        rules.append(same(f"{ours}.post_mlp_layernorm.weight",
                          f"{theirs}.post_feedforward_layernorm.weight"))
    rules.append(same("decoder.final_layernorm.weight", "model.norm.weight"))
    if not info.tie_word_embeddings:
        rules.append(same("output_layer.weight", "lm_head.weight"))
    return rules


# ------------------------------------------------------------------ the registered architecture
class Gemma2Architecture:
    """Gemma 2 (`model_type` "gemma2"), a `CausalLMArchitecture`.

    The sandwich norms and the layer pattern live in the layer specs, not in the config, so a
    protoformer model exports as Gemma 2 only when it was read from Gemma 2 or `config=`
    names it (`exports_by_default = False`).
    """

    model_type = "gemma2"
    hf_class = _HF_CLASS
    exports_by_default = False

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_gemma2_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        reader = ConfigReader(info.hf_config, f"{_HF_CLASS} config")
        return gemma2_layer_specs(backend, info.config,
                                  gemma_windows(reader, info.config.num_layers, pattern=2))

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return sandwich_rules(info, dense_attention_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_gemma2_config(config, sizes)


register_architecture(Gemma2Architecture())


# ------------------------------------------------------------------ presets of published sizes
def _gemma2_2b() -> TransformerConfig:
    # google/gemma-2-2b: 26 layers, hidden 2304, 8 query heads over 4 key/value heads of 256,
    # GeGLU 9216, scores scaled by 256 ** -0.5 and soft-capped at 50, logits at 30.
    return TransformerConfig(
        num_layers=26, hidden_size=2304, num_attention_heads=8, num_query_groups=4,
        kv_channels=256, ffn_hidden_size=9216, normalization="RMSNorm", layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=True, add_bias_linear=False, gated_linear_unit=True,
        activation_func=gelu_tanh, attention_dropout=0.0, hidden_dropout=0.0,
        softmax_scale=256 ** -0.5, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        rotary_base=10000.0, embedding_multiplier=math.sqrt(2304),
        params_dtype=torch.bfloat16, bf16=True)


def _gemma2_2b_specs(backend: BackendSpecProvider, config: TransformerConfig) -> LayerSpecs:
    # Even layers slide over 4096 positions, odd layers are global.
    return gemma2_layer_specs(backend, config, [4096 if index % 2 == 0 else None
                                                for index in range(config.num_layers)])


register_preset(Preset(
    "gemma2-2b", "Gemma 2 2B shapes (26 layers, hidden 2304, GQA 8/4 with 256-wide heads, "
    "GeGLU 9216, vocab 256000, sandwich norms, sliding window 4096 on every other layer, "
    "attention/final soft-capping 50/30)",
    _gemma2_2b, vocab_size=256000, max_sequence_length=8192,
    layer_spec=_gemma2_2b_specs, tie_embeddings=True))
