"""Mixtral (`MixtralForCausalLM`) <-> protoformer's GPT layers with an `MoELayer` in every layer.

Config: the attention is Mistral's (grouped-query, RMSNorm, plain RoPE); every layer's MLP is
`num_local_experts` SwiGLU experts of width `intermediate_size`, `num_experts_per_tok` chosen
by a softmax router whose top-k weights are renormalised (`moe_router_pre_softmax=False`).

Weights: checkpoint files keep Mixtral's original names, `block_sparse_moe.gate` and
`block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down); transformers 5 models hold
`mlp.gate` and the fused `mlp.experts.gate_up_proj`/`down_proj` (see `moe_conversion`).
A `sliding_window` shorter than the context makes every layer's attention sliding-window
attention (`gpt_layer_spec(window_size=...)`), as in Mistral. Refused: router jitter noise.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from protoformer.architectures.conversion import (
    ConfigReader,
    HFConversionError,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    model_rules,
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.moe_conversion import (
    MOE_DESCRIBED_FIELDS,
    ExpertNames,
    gpt_moe_config_values,
    gpt_moe_exportable_problems,
    moe_layer_rules,
    read_gpt_moe_info,
)
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.moe import moe_layer_specs
from protoformer.transformer.block import LayerSpecs

__all__ = ["MixtralArchitecture"]

_HF_CLASS = "MixtralForCausalLM"
_WHERE = f"{_HF_CLASS} config"
_NAMES = ExpertNames(block="block_sparse_moe", fused_block="mlp", router="gate",
                     gate="w1", up="w3", down="w2")
# Every layer has experts, so the dense `ffn_hidden_size` describes nothing.
_DESCRIBED = tuple(name for name in MOE_DESCRIBED_FIELDS if name != "ffn_hidden_size")


def parse_mixtral_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """A Mixtral config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, _WHERE)
    _window(values)  # a malformed window fails here, with the config
    jitter = reader.get_float("router_jitter_noise", 0.0)
    if jitter:
        raise UnsupportedHFModelError(
            f"{_WHERE}: router_jitter_noise={jitter} is not supported; protoformer's router "
            "adds no noise in training (set it to 0.0)")
    return read_gpt_moe_info(reader, dtype, model_type="mixtral", architecture=_HF_CLASS,
                             experts_key="num_local_experts", expert_ffn_key="intermediate_size",
                             normalize_topk=True, described_fields=_DESCRIBED)


def _window(values: Mapping[str, object]) -> int | None:
    """Every layer's attention window, or None when it is at least the context (blocks nothing)."""
    reader = ConfigReader(values, _WHERE)
    window = reader.get_optional_int("sliding_window")
    if window is None or window >= reader.get_int("max_position_embeddings"):
        return None
    if window < 1:
        raise HFConversionError(f"{_WHERE}: sliding_window={window} must be >= 1 or null")
    return window


def export_mixtral_config(config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
    """A Mixtral config.json mapping for a protoformer MoE model, or the reasons it is not one."""
    problems = gpt_moe_exportable_problems(config)
    if config.num_moe_experts is not None:
        if config.qk_layernorm:
            problems.append("qk_layernorm=True (Mixtral has no q/k norms)")
        if config.add_qkv_bias:
            problems.append("add_qkv_bias=True (Mixtral has no biases)")
        if not all(config.moe_layer_pattern):
            problems.append("dense layers (every Mixtral layer has experts)")
        if not config.moe_normalizes_topk_probs:
            problems.append("moe_router_pre_softmax=True (Mixtral renormalises the top-k weights)")
        if config.moe_shared_expert_intermediate_size is not None:
            problems.append("shared experts (Mixtral has none)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))
    values = gpt_moe_config_values(config, sizes, model_type="mixtral", hf_class=_HF_CLASS)
    values.update({
        "intermediate_size": config.moe_ffn_size,
        "num_local_experts": config.num_moe_experts,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    })
    return values


class MixtralArchitecture:
    """Mixtral (`CausalLMArchitecture`): `moe_layer_specs` over `gpt_layer_spec` (with the
    sliding window), experts in every layer."""

    model_type = "mixtral"
    hf_class = _HF_CLASS
    exports_by_default = True

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_mixtral_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        dense = functools.partial(gpt_layer_spec, window_size=_window(info.hf_config))
        return moe_layer_specs(backend, info.config, dense)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return model_rules(info, dense_attention_rules, moe_layer_rules(_NAMES))

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_mixtral_config(config, sizes)


register_architecture(MixtralArchitecture())
