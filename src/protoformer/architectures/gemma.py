"""Gemma decoders <-> protoformer's `gpt_layer_spec` layers with Gemma's options.

Gemma: token embeddings scaled by `sqrt(hidden_size)` (`config.embedding_multiplier`), RMSNorm
scaling by `1 + w` (`config.layernorm_zero_centered_gamma`; the checkpoint stores `w`), a
gated tanh-GeLU MLP, `head_dim` independent of `hidden_size / num_attention_heads` (e.g.
MQA with one key/value head), the output layer tied to the embedding.

Weights: q/k/v fuse into `linear_qkv` and gate/up into `linear_fc1` as for Llama
(`architectures.llama`); norms keep their stored `w`. Gemma 2 and 3 (soft-capping, sandwich
norms, per-layer rope bases) are not supported yet: their model types are not registered.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

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
)
from protoformer.architectures.decoder_config import (
    decoder_config_values,
    read_decoder_config,
    read_head_dim,
    require_default_rope,
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.mlp import gelu_tanh

__all__ = [
    "GemmaArchitecture",
    "export_gemma_config",
    "gemma_config",
    "gemma_config_values",
    "gemma_exportable_problems",
    "parse_gemma_config",
    "refuse_gemma_options",
]

_HF_CLASSES = {"gemma": "GemmaForCausalLM"}


# ------------------------------------------------------------------ config: HF -> protoformer
def refuse_gemma_options(reader: ConfigReader) -> None:
    """The Gemma options (every generation) protoformer does not represent, refused by name."""
    if reader.get_bool("attention_bias", False):
        raise UnsupportedHFModelError(
            f"{reader.where}: attention_bias=true puts a bias on o_proj but not on the MLP, "
            "which protoformer's add_bias_linear cannot represent")
    if reader.get_bool("use_bidirectional_attention", False):
        raise UnsupportedHFModelError(f"{reader.where}: use_bidirectional_attention=true is not "
                                      "supported; protoformer's Gemma layers are causal")


def gemma_config(reader: ConfigReader, dtype: torch.dtype, *, head_dim: int, hidden_act: str,
                 rotary_base: float) -> TransformerConfig:
    """The `TransformerConfig` every Gemma generation shares: a Llama-style decoder
    (`read_decoder_config`) with `(1 + w)` RMSNorm and embeddings scaled by
    `sqrt(hidden_size)`. Gemma 2 and 3 replace what they add."""
    activation = activation_for(ConfigReader({"hidden_act": hidden_act}, reader.where))
    base = read_decoder_config(reader, dtype, head_dim=head_dim, rotary_base=rotary_base,
                               activation_func=activation)
    return checked_config(reader, lambda: dataclasses.replace(
        base, layernorm_zero_centered_gamma=True,
        embedding_multiplier=math.sqrt(base.hidden_size)))


def parse_gemma_config(values: Mapping[str, object], model_type: str,
                       dtype: torch.dtype) -> HFModelInfo:
    """A Gemma config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, f"{_HF_CLASSES[model_type]} config")
    head_dim = read_head_dim(reader)
    theta, _ = require_default_rope(reader, model_type)
    refuse_gemma_options(reader)
    config = gemma_config(reader, dtype, head_dim=head_dim, rotary_base=theta,
                          hidden_act=reader.get_str("hidden_act", "gelu_pytorch_tanh"))
    names: tuple[str, ...] = (*DESCRIBED_FIELDS, "num_query_groups", "kv_channels",
                              "layernorm_zero_centered_gamma", "embedding_multiplier")
    return hf_model_info(reader, config, model_type=model_type,
                         architecture=_HF_CLASSES[model_type], tied_by_default=True,
                         described_fields=names)


# ------------------------------------------------------------------ config: protoformer -> HF
def gemma_exportable_problems(config: TransformerConfig, *, qk_layernorm: bool) -> list[str]:
    """Why `config` is not a Gemma config with (or without) per-head q/k norms (empty when
    it is); each generation adds its own checks."""
    problems: list[str] = []
    if type(config) is not TransformerConfig:
        problems.append(f"a {type(config).__name__} (Gemma takes a plain TransformerConfig)")
    if config.normalization != "RMSNorm" or not config.layernorm_zero_centered_gamma:
        problems.append("Gemma's norms are RMSNorm with layernorm_zero_centered_gamma=True")
    if not math.isclose(config.embedding_multiplier, math.sqrt(config.hidden_size)):
        problems.append(f"embedding_multiplier={config.embedding_multiplier} (Gemma scales "
                        f"the embeddings by sqrt(hidden_size)={math.sqrt(config.hidden_size)})")
    if not config.gated_linear_unit or config.add_bias_linear or config.add_qkv_bias:
        problems.append("Gemma has a gated MLP and no biases")
    if config.qk_layernorm != qk_layernorm:
        problems.append(f"qk_layernorm={config.qk_layernorm} (this Gemma has "
                        f"{'per-head' if qk_layernorm else 'no'} q/k norms)")
    if config.rotary_percent != 1.0 or config.rotary_interleaved:
        problems.append("Gemma rotates whole heads, in halves")
    return problems


def gemma_config_values(config: TransformerConfig, sizes: ModelSizes, *, model_type: str,
                        hf_class: str) -> JSONDict:
    """The config.json values every Gemma generation writes."""
    values = decoder_config_values(config, sizes, model_type=model_type, hf_class=hf_class)
    values.update({"intermediate_size": config.ffn_size, "attention_bias": False})
    return values


def export_gemma_config(config: TransformerConfig, sizes: ModelSizes, model_type: str) -> JSONDict:
    """A config.json mapping for a Gemma model."""
    problems = gemma_exportable_problems(config, qk_layernorm=False)
    if config.rope_scaling is not None:
        problems.append("Gemma has no rope scaling")
    if config.softmax_scale is not None:
        problems.append(f"softmax_scale={config.softmax_scale} (Gemma uses 1/sqrt(head_dim))")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name) is not None:
            problems.append(f"{name}={getattr(config, name)} (the first Gemma does not "
                            "soft-cap; export it as gemma2)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASSES[model_type]}: "
                                      + "; ".join(problems))
    values = gemma_config_values(config, sizes, model_type=model_type,
                                 hf_class=_HF_CLASSES[model_type])
    values.update({
        "hidden_act": activation_name(config),
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "rope_theta": config.rotary_base,
    })
    return values


# ------------------------------------------------------------------ the registered architectures
@dataclasses.dataclass(frozen=True)
class GemmaArchitecture:
    """Gemma (`model_type` "gemma"), a `CausalLMArchitecture`."""

    model_type: str
    exports_by_default: bool = True

    @property
    def hf_class(self) -> str:
        return _HF_CLASSES[self.model_type]

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_gemma_config(values, self.model_type, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        return gpt_layer_spec(backend, info.config)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return model_rules(info, dense_attention_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_gemma_config(config, sizes, self.model_type)


register_architecture(GemmaArchitecture("gemma"))


# ------------------------------------------------------------------ presets of published sizes
def _gemma_2b() -> TransformerConfig:
    # google/gemma-2b: 18 layers, hidden 2048, 8 query heads sharing one key/value head (MQA)
    # of size 256, gated tanh-GeLU MLP of 16384, vocabulary 256000, 8192 positions.
    return TransformerConfig(
        num_layers=18, hidden_size=2048, num_attention_heads=8, num_query_groups=1,
        kv_channels=256, ffn_hidden_size=16384, normalization="RMSNorm", layernorm_epsilon=1e-6,
        layernorm_zero_centered_gamma=True, add_bias_linear=False, gated_linear_unit=True,
        activation_func=gelu_tanh, attention_dropout=0.0, hidden_dropout=0.0,
        rotary_base=10000.0, embedding_multiplier=math.sqrt(2048),
        params_dtype=torch.bfloat16, bf16=True)


register_preset(Preset(
    "gemma-2b", "Gemma 2B shapes (18 layers, hidden 2048, MQA 8/1 with 256-wide heads, "
    "GeGLU 16384, vocab 256000, embeddings scaled by sqrt(hidden), (1 + w) RMSNorm)",
    _gemma_2b, vocab_size=256000, max_sequence_length=8192,
    layer_spec=gpt_layer_spec, tie_embeddings=True))
