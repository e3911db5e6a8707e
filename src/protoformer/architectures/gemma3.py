"""Gemma 3 text decoders (`Gemma3ForCausalLM`, model_type "gemma3_text") <-> protoformer layers.

Gemma 3 keeps Gemma 2's layer (`architectures.gemma2.gemma2_layer_spec`: sandwich norms,
`(1 + w)` RMSNorm, scaled embeddings, `query_pre_attn_scalar`, optional soft-capping) and adds:

- per-head q/k RMSNorm (`config.qk_layernorm`, `(1 + w)` like every Gemma norm);
- five sliding layers per global one (`layer_types`, else `sliding_window_pattern`, default 6:
  every sixth layer is global);
- a rotary base per layer kind: global layers use the model's table (`rope_theta`, with
  "linear" rope scaling where the config has it), sliding layers their own table with base
  `rope_local_base_freq` (`SelfAttention(rotary_base=...)`).

Both config.json layouts are read: the hub's (`rope_theta`, `rope_local_base_freq`,
`rope_scaling`) and transformers 5's (`rope_parameters` keyed by layer type). The multimodal
Gemma 3 (`Gemma3ForConditionalGeneration`, model_type "gemma3": a vision tower and projector)
is refused by `protoformer.architectures.registry` with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from protoformer.architectures.conversion import (
    ConfigReader,
    HFConversionError,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    hf_model_info,
)
from protoformer.architectures.gemma import gemma_exportable_problems, refuse_gemma_options
from protoformer.architectures.gemma2 import (
    GEMMA2_DESCRIBED_FIELDS,
    gemma2_config_values,
    gemma2_layer_specs,
    gemma_family_config,
    gemma_windows,
    sandwich_rules,
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.registry import (
    ModelSizes,
    refuse_model_type,
    register_architecture,
)
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.mlp import gelu_tanh

__all__ = ["Gemma3TextArchitecture", "gemma3_rotary_bases"]

_HF_CLASS = "Gemma3ForCausalLM"
_WHERE = f"{_HF_CLASS} config"
_DESCRIBED = (*GEMMA2_DESCRIBED_FIELDS, "rope_scaling", "rope_scaling_factor")
_LOCAL_BASE_KEY = "rope_local_base_freq"


@dataclasses.dataclass(frozen=True)
class GlobalRope:
    """The global layers' rotary settings: base, and "linear" scaling's factor (None: none)."""

    base: float
    linear_factor: float | None


def gemma3_rotary_bases(reader: ConfigReader) -> tuple[GlobalRope, float]:
    """(the global layers' rope, the sliding layers' base) from either config layout."""
    params = reader.get_mapping("rope_parameters")
    nested = params is not None and any(isinstance(v, Mapping) for v in params.values())
    if nested and params is not None:
        full = ConfigReader(_sub(params, "full_attention", reader),
                            f"{reader.where} rope_parameters.full_attention")
        local = ConfigReader(_sub(params, "sliding_attention", reader),
                             f"{reader.where} rope_parameters.sliding_attention")
    else:
        legacy = reader.get_mapping("rope_scaling") or params or {}
        full = ConfigReader({**legacy, "rope_theta": legacy.get(
            "rope_theta", reader.values.get("rope_theta", 1_000_000.0))},
            f"{reader.where} rope_scaling")
        local = ConfigReader({"rope_type": "default", "rope_theta": reader.values.get(
            _LOCAL_BASE_KEY, 10_000.0)}, reader.where)
    local_type = local.get_str("rope_type", local.get_str("type", "default"))
    if local_type != "default":
        raise UnsupportedHFModelError(f"{local.where}: rope_type={local_type!r} is not "
                                      "supported for the sliding layers; protoformer maps "
                                      "'default'")
    full_type = full.get_str("rope_type", full.get_str("type", "default"))
    factor: float | None = None
    if full_type == "linear":
        factor = full.get_float("factor")
        if not factor >= 1.0:
            raise HFConversionError(f"{full.where}: factor={factor} must be >= 1")
    elif full_type != "default":
        raise UnsupportedHFModelError(f"{full.where}: rope_type={full_type!r} is not supported "
                                      "for Gemma 3; protoformer maps 'default' and 'linear'")
    return (GlobalRope(full.get_float("rope_theta", 1_000_000.0), factor),
            local.get_float("rope_theta", 10_000.0))


def _sub(params: Mapping[str, object], key: str, reader: ConfigReader) -> JSONDict:
    value = ConfigReader(params, f"{reader.where} rope_parameters").get_mapping(key)
    return value if value is not None else {}


def parse_gemma3_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """A Gemma 3 text config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, _WHERE)
    refuse_gemma_options(reader)
    global_rope, _ = gemma3_rotary_bases(reader)
    config = gemma_family_config(
        reader, dtype, rotary_base=global_rope.base, qk_layernorm=True,
        attn_softcap=reader.get_float("attn_logit_softcapping")
        if reader.present("attn_logit_softcapping") else None,
        final_softcap=reader.get_float("final_logit_softcapping")
        if reader.present("final_logit_softcapping") else None)
    if global_rope.linear_factor is not None:
        config = dataclasses.replace(config, rope_scaling="linear",
                                     rope_scaling_factor=global_rope.linear_factor)
    _windows(reader, config.num_layers)  # a malformed window fails here, with the config
    return hf_model_info(reader, config, model_type="gemma3_text", architecture=_HF_CLASS,
                         tied_by_default=True, described_fields=_DESCRIBED)


def _windows(reader: ConfigReader, num_layers: int) -> tuple[int | None, ...]:
    return gemma_windows(reader, num_layers, pattern=reader.get_int("sliding_window_pattern", 6))


def export_gemma3_config(config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
    """A Gemma 3 text config.json mapping: the default layer pattern (five of six layers slide
    by 4096) and local rotary base 10000."""
    problems = gemma_exportable_problems(config, qk_layernorm=True)
    if config.rope_scaling not in (None, "linear"):
        problems.append(f"rope_scaling={config.rope_scaling!r} (Gemma 3 has 'linear' or none)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))
    values = gemma2_config_values(config, sizes, model_type="gemma3_text", hf_class=_HF_CLASS)
    full: JSONDict = {"rope_type": "default", "rope_theta": config.rotary_base}
    if config.rope_scaling == "linear":
        full = {"rope_type": "linear", "factor": config.rope_scaling_factor,
                "rope_theta": config.rotary_base}
    values.update({
        "rope_parameters": {"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": 10_000.0}},
        "sliding_window": 4096,
        "layer_types": ["full_attention" if (index + 1) % 6 == 0 else "sliding_attention"
                        for index in range(config.num_layers)],
    })
    return values


class Gemma3TextArchitecture:
    """Gemma 3 text (`model_type` "gemma3_text"), a `CausalLMArchitecture`; like Gemma 2 it
    exports only when read from Gemma 3 or named by `config=`."""

    model_type = "gemma3_text"
    hf_class = _HF_CLASS
    exports_by_default = False

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_gemma3_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        reader = ConfigReader(info.hf_config, _WHERE)
        _, local_base = gemma3_rotary_bases(reader)
        return gemma2_layer_specs(backend, info.config, _windows(reader, info.config.num_layers),
                                  local_rotary_base=local_base)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return sandwich_rules(info, dense_attention_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_gemma3_config(config, sizes)


register_architecture(Gemma3TextArchitecture())
refuse_model_type(
    "gemma3", "is the multimodal Gemma 3 (Gemma3ForConditionalGeneration: a SigLIP vision tower "
    "and projector before the decoder), which protoformer does not support; convert a text-only "
    "checkpoint (model_type 'gemma3_text', Gemma3ForCausalLM)")


# ------------------------------------------------------------------ presets of published sizes
def _gemma3_1b() -> TransformerConfig:
    # google/gemma-3-1b-pt: 26 layers, hidden 1152, 4 query heads sharing one key/value head
    # of 256 (MQA), GeGLU 6912, per-head q/k norms, global rope base 1e6 without scaling.
    return TransformerConfig(
        num_layers=26, hidden_size=1152, num_attention_heads=4, num_query_groups=1,
        kv_channels=256, ffn_hidden_size=6912, normalization="RMSNorm", layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=True, qk_layernorm=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=gelu_tanh, attention_dropout=0.0,
        hidden_dropout=0.0, softmax_scale=256 ** -0.5, rotary_base=1_000_000.0,
        embedding_multiplier=math.sqrt(1152), params_dtype=torch.bfloat16, bf16=True)


def _gemma3_1b_specs(backend: BackendSpecProvider, config: TransformerConfig) -> LayerSpecs:
    # Five layers of six slide over 512 positions with rope base 10000; every sixth is global.
    windows = [None if (index + 1) % 6 == 0 else 512 for index in range(config.num_layers)]
    return gemma2_layer_specs(backend, config, windows, local_rotary_base=10_000.0)


register_preset(Preset(
    "gemma3-1b", "Gemma 3 1B text shapes (26 layers, hidden 1152, MQA 4/1 with 256-wide heads, "
    "GeGLU 6912, vocab 262144, q/k norms, sandwich norms, 5 sliding (512, rope base 1e4) : 1 "
    "global (rope base 1e6) layers)",
    _gemma3_1b, vocab_size=262144, max_sequence_length=32768,
    layer_spec=_gemma3_1b_specs, tie_embeddings=True))
