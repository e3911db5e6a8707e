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
    HFConversionError,
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
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.mlp import gelu_tanh

__all__ = ["GemmaArchitecture", "export_gemma_config", "parse_gemma_config"]

_HF_CLASSES = {"gemma": "GemmaForCausalLM"}


# ------------------------------------------------------------------ config: HF -> protoformer
def parse_gemma_config(values: Mapping[str, object], model_type: str,
                       dtype: torch.dtype) -> HFModelInfo:
    """A Gemma config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, f"{_HF_CLASSES[model_type]} config")
    hidden = reader.get_int("hidden_size")
    heads = reader.get_int("num_attention_heads")
    head_dim = reader.get_optional_int("head_dim")
    if head_dim is None:
        if hidden % heads != 0:
            raise HFConversionError(f"{reader.where}: hidden_size={hidden} is not divisible by "
                                    f"num_attention_heads={heads} and head_dim is not given")
        head_dim = hidden // heads
    rope_type, theta, _ = read_rope(reader)
    if rope_type != "default":
        raise UnsupportedHFModelError(f"{reader.where}: rope_type={rope_type!r} is not "
                                      f"supported; protoformer maps 'default' for {model_type}")
    if reader.get_bool("attention_bias", False):
        raise UnsupportedHFModelError(
            f"{reader.where}: attention_bias=true puts a bias on o_proj but not on the MLP, "
            "which protoformer's add_bias_linear cannot represent")
    if reader.get_bool("use_bidirectional_attention", False):
        raise UnsupportedHFModelError(f"{reader.where}: use_bidirectional_attention=true is not "
                                      "supported; protoformer's Gemma layers are causal")
    activation = activation_for(ConfigReader(
        {"hidden_act": reader.get_str("hidden_act", "gelu_pytorch_tanh")}, reader.where))
    config = checked_config(reader, lambda: TransformerConfig(
        num_layers=reader.get_int("num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=reader.get_optional_int("num_key_value_heads") or heads,
        kv_channels=head_dim,
        ffn_hidden_size=reader.get_int("intermediate_size"),
        normalization="RMSNorm",
        layernorm_epsilon=reader.get_float("rms_norm_eps", 1e-6),
        layernorm_zero_centered_gamma=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=activation,
        init_method_std=reader.get_float("initializer_range", 0.02),
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_dropout=reader.get_float("attention_dropout", 0.0),
        hidden_dropout=0.0,
        rotary_base=theta,
        embedding_multiplier=math.sqrt(hidden),
    ))
    names: tuple[str, ...] = (*DESCRIBED_FIELDS, "num_query_groups", "kv_channels",
                              "layernorm_zero_centered_gamma", "embedding_multiplier")
    return hf_model_info(reader, config, model_type=model_type,
                         architecture=_HF_CLASSES[model_type], tied_by_default=True,
                         described_fields=names)


# ------------------------------------------------------------------ config: protoformer -> HF
def _check_exportable(config: TransformerConfig, model_type: str) -> None:
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
    if config.qk_layernorm or config.rotary_percent != 1.0 or config.rotary_interleaved \
            or config.rope_scaling is not None:
        problems.append("Gemma has no q/k norms and plain rotary embeddings of whole heads")
    if config.softmax_scale is not None:
        problems.append(f"softmax_scale={config.softmax_scale} (Gemma uses 1/sqrt(head_dim))")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASSES[model_type]}: "
                                      + "; ".join(problems))


def export_gemma_config(config: TransformerConfig, sizes: ModelSizes, model_type: str) -> JSONDict:
    """A config.json mapping for a Gemma model."""
    _check_exportable(config, model_type)
    values: JSONDict = {
        "architectures": [_HF_CLASSES[model_type]],
        "model_type": model_type,
        "vocab_size": sizes.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.query_groups,
        "head_dim": config.head_dim,
        "max_position_embeddings": sizes.max_sequence_length,
        "rms_norm_eps": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "attention_dropout": config.attention_dropout,
        "attention_bias": False,
        "tie_word_embeddings": sizes.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "rope_theta": config.rotary_base,
        "use_cache": True,
    }
    values["hidden_act"] = activation_name(config)
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
