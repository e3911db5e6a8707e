"""OLMo 2 (`Olmo2ForCausalLM`) <-> protoformer layers with post-norms and whole-projection q/k norms.

An OLMo 2 layer normalizes each branch's *output* before the residual add and has no
pre-norms: `x + norm(attn(x))`, then `+ norm(mlp(.))` (`post_self_attn_layernorm` /
`post_mlp_layernorm` slots, `IdentityOp` in the pre-norm slots). Its queries and keys are
RMS-normalized over the whole projection before the heads are split (`ProjectionRMSNorm` in
the q/k norm slots, checkpoint names `q_norm` / `k_norm`); otherwise the attention and the
SwiGLU MLP are Llama's, with plain RoPE and no biases.

The post-norm layout and the whole-projection norms live in the layer spec, not in the
config, so a model exports as OLMo 2 only when read from OLMo 2 or named by `config=`.
Refused: `attention_bias`, rope scaling, a `head_dim` other than
`hidden_size / num_attention_heads`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from protoformer.architectures.conversion import (
    DESCRIBED_FIELDS,
    ConfigReader,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    activation_name,
    hf_model_info,
)
from protoformer.architectures.decoder_config import decoder_config_values
from protoformer.architectures.gemma2 import sandwich_rules
from protoformer.architectures.moe_conversion import read_gpt_attention_config
from protoformer.architectures.olmoe import (
    check_olmo_head_dim,
    olmo_attention_rules,
    olmo_attention_submodules,
    refuse_clip_qkv,
)
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import mlp_spec
from protoformer.recipes.presets import Preset, register_preset
from protoformer.transformer.attention import SelfAttention
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.mlp import MLP
from protoformer.transformer.norm import IdentityOp

__all__ = ["Olmo2Architecture", "olmo2_layer_spec"]

_HF_CLASS = "Olmo2ForCausalLM"
_WHERE = f"{_HF_CLASS} config"


def olmo2_layer_spec(backend: BackendSpecProvider,
                     config: TransformerConfig) -> TransformerLayerSubmodules:
    """An OLMo 2 layer: no pre-norms (`IdentityOp`), RMSNorm after attention and after the
    MLP, `ProjectionRMSNorm` q/k norms over all query heads / all key-value heads."""
    if config.qk_layernorm:
        raise ValueError("olmo2_layer_spec: config.qk_layernorm=True asks for per-head q/k "
                         "norms; OLMo 2 normalizes the whole projection (leave it False)")
    norm = backend.layer_norm(rms_norm=True)
    return TransformerLayerSubmodules(
        input_layernorm=IdentityOp,
        self_attention=functools.partial(SelfAttention,
                                         submodules=olmo_attention_submodules(backend, config),
                                         attn_mask_type=AttnMaskType.padding_causal),
        post_self_attn_layernorm=norm,
        pre_mlp_layernorm=IdentityOp,
        mlp=functools.partial(MLP, submodules=mlp_spec(backend, config)),
        post_mlp_layernorm=norm,
    )


def parse_olmo2_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """An OLMo 2 config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, _WHERE)
    if reader.get_bool("attention_bias", False):
        raise UnsupportedHFModelError(f"{_WHERE}: attention_bias=true puts a bias on o_proj but "
                                      "not on the MLP, which add_bias_linear cannot represent")
    refuse_clip_qkv(reader)
    config = read_gpt_attention_config(reader, dtype,
                                       ffn_hidden_size=reader.get_int("intermediate_size"),
                                       qk_layernorm=False, add_qkv_bias=False)
    check_olmo_head_dim(config, _WHERE)
    return hf_model_info(reader, config, model_type="olmo2", architecture=_HF_CLASS,
                         described_fields=(*DESCRIBED_FIELDS, "num_query_groups", "kv_channels"))


def export_olmo2_config(config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
    """An OLMo 2 config.json mapping for a model built by `olmo2_layer_spec`."""
    problems: list[str] = []
    if type(config) is not TransformerConfig:
        problems.append(f"a {type(config).__name__} (OLMo 2 takes a plain TransformerConfig)")
    if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
        problems.append("OLMo 2's norms are plain RMSNorm")
    if not config.gated_linear_unit or config.add_bias_linear or config.add_qkv_bias \
            or config.qk_layernorm:
        problems.append("OLMo 2 has a gated MLP, no biases and whole-projection q/k norms")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        problems.append("head_dim * num_attention_heads != hidden_size")
    if config.rope_scaling is not None or config.rotary_percent != 1.0 \
            or config.rotary_interleaved or config.embedding_multiplier != 1.0:
        problems.append("OLMo 2 has plain rotary embeddings of whole heads and unscaled "
                        "embeddings")
    if config.softmax_scale is not None or config.attn_logit_softcapping is not None \
            or config.final_logit_softcapping is not None:
        problems.append("OLMo 2 scales scores by 1/sqrt(head_dim) and soft-caps nothing")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))
    values = decoder_config_values(config, sizes, model_type="olmo2", hf_class=_HF_CLASS)
    del values["head_dim"]  # transformers derives it from the heads (checked equal above)
    values.update({
        "intermediate_size": config.ffn_size,
        "hidden_act": activation_name(config),
        "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "rope_theta": config.rotary_base,
    })
    return values


class Olmo2Architecture:
    """OLMo 2 (`CausalLMArchitecture`): `olmo2_layer_spec` for every layer."""

    model_type = "olmo2"
    hf_class = _HF_CLASS
    exports_by_default = False  # the post-norm layout is in the layer spec, not the config

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_olmo2_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        return olmo2_layer_spec(backend, info.config)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return sandwich_rules(info, olmo_attention_rules, pre_norms=False)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_olmo2_config(config, sizes)


register_architecture(Olmo2Architecture())


# ------------------------------------------------------------------ presets of published sizes
def _olmo2_1b() -> TransformerConfig:
    # allenai/OLMo-2-0425-1B: 16 layers, hidden 2048, 16 heads, SwiGLU 8192, RoPE base 500000.
    return TransformerConfig(
        num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192,
        normalization="RMSNorm", layernorm_epsilon=1e-6, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, attention_dropout=0.0,
        hidden_dropout=0.0, rotary_base=500_000.0, params_dtype=torch.bfloat16, bf16=True)


register_preset(Preset(
    "olmo2-1b", "OLMo 2 1B shapes (16 layers, hidden 2048, 16 heads, SwiGLU 8192, vocab 100352, "
    "norms after attention and MLP only, q/k norms over the whole projection)",
    _olmo2_1b, vocab_size=100352, max_sequence_length=4096,
    layer_spec=olmo2_layer_spec, tie_embeddings=False))
