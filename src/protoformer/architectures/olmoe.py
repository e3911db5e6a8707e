"""OLMoE (`OlmoeForCausalLM`) <-> protoformer GPT layers with an `MoELayer` in every layer and
q/k norms over the whole projection.

Config: Llama-style attention whose queries and keys are RMS-normalized over all heads at
once (`q_norm [np * hn]`, `k_norm [ng * hn]`: `ProjectionRMSNorm` in the q/k norm slots,
built by `olmoe_layer_spec`; `config.qk_layernorm` stays False, it means per-head norms);
`num_experts` SwiGLU experts of width `intermediate_size`, `num_experts_per_tok` chosen by a
softmax router (`norm_topk_prob` renormalises the top-k weights).

The whole-projection norm lives in the layer spec, not in the config, so a protoformer model
is exported as OLMoE only when it was read from OLMoE or `config=` names it
(`exports_by_default = False`). Refused: `clip_qkv`, `attention_bias`, a `head_dim` other than
`hidden_size / num_attention_heads` (transformers sizes the norms by the latter).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from protoformer.architectures.conversion import (
    ConfigReader,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    model_rules,
    same,
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.moe_conversion import (
    MOE_DESCRIBED_FIELDS,
    ExpertNames,
    gpt_moe_config_values,
    gpt_moe_exportable_problems,
    moe_layer_rules,
    read_gpt_moe_info,
    refuse_attention_bias,
    refuse_sliding_window,
)
from protoformer.architectures.registry import ModelSizes, register_architecture
from protoformer.backends.base import BackendSpecProvider
from protoformer.config import TransformerConfig
from protoformer.recipes.gpt import gpt_layer_spec
from protoformer.recipes.moe import moe_layer_specs
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules
from protoformer.transformer.block import LayerSpecs
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayerSubmodules
from protoformer.transformer.projection_norm import ProjectionRMSNorm

__all__ = [
    "OlmoeArchitecture",
    "check_olmo_head_dim",
    "olmo_attention_rules",
    "olmo_attention_submodules",
    "olmoe_layer_spec",
    "refuse_clip_qkv",
]

_HF_CLASS = "OlmoeForCausalLM"
_WHERE = f"{_HF_CLASS} config"
_DESCRIBED = tuple(name for name in MOE_DESCRIBED_FIELDS if name != "ffn_hidden_size")


def olmo_attention_submodules(backend: BackendSpecProvider,
                              config: TransformerConfig) -> SelfAttentionSubmodules:
    """OLMo's self-attention (OLMoE and OLMo 2): Llama's, with `ProjectionRMSNorm` q/k norms over
    all query heads and over all key/value heads."""
    return SelfAttentionSubmodules(
        linear_qkv=backend.column_parallel_linear(),
        core_attention=backend.core_attention(),
        linear_proj=backend.row_parallel_linear(),
        q_layernorm=functools.partial(ProjectionRMSNorm, num_heads=config.num_attention_heads),
        k_layernorm=functools.partial(ProjectionRMSNorm, num_heads=config.query_groups),
    )


def refuse_clip_qkv(reader: ConfigReader) -> None:
    """OLMo's `clip_qkv` (clamping queries, keys and values) is not represented: refused."""
    clip = reader.values.get("clip_qkv")
    if clip is not None:
        raise UnsupportedHFModelError(f"{reader.where}: clip_qkv={clip!r} is not supported; "
                                      "protoformer does not clamp queries, keys and values (set "
                                      "it to null)")


def check_olmo_head_dim(config: TransformerConfig, where: str) -> None:
    """transformers sizes OLMo's heads and whole-projection q/k norms by `hidden_size /
    num_attention_heads`: a checkpoint whose `head_dim` differs is refused."""
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise UnsupportedHFModelError(
            f"{where}: head_dim={config.head_dim} with hidden_size={config.hidden_size} and "
            f"num_attention_heads={config.num_attention_heads}: transformers sizes OLMo's heads "
            "and q/k norms by hidden_size / num_attention_heads, so head_dim must equal it")


def olmo_attention_rules(info: HFModelInfo, ours: str, theirs: str) -> list[TensorRule]:
    """Llama's attention tensors (`dense_attention_rules`) and the whole-projection q/k norms."""
    return [*dense_attention_rules(info, ours, theirs),
            same(f"{ours}.q_layernorm.weight", f"{theirs}.q_norm.weight"),
            same(f"{ours}.k_layernorm.weight", f"{theirs}.k_norm.weight")]


def olmoe_layer_spec(backend: BackendSpecProvider,
                     config: TransformerConfig) -> TransformerLayerSubmodules:
    """`gpt_layer_spec` with `ProjectionRMSNorm` q/k norms (over all query heads, over all
    key/value heads); `recipes.moe.moe_layer_specs` puts the experts in its `mlp` slot."""
    if config.qk_layernorm:
        raise ValueError("olmoe_layer_spec: config.qk_layernorm=True asks for per-head q/k norms; "
                         "OLMoE normalizes the whole projection (leave qk_layernorm False)")
    layer = gpt_layer_spec(backend, config)
    return TransformerLayerSubmodules(
        input_layernorm=layer.input_layernorm,
        self_attention=functools.partial(SelfAttention,
                                         submodules=olmo_attention_submodules(backend, config),
                                         attn_mask_type=AttnMaskType.padding_causal),
        pre_mlp_layernorm=layer.pre_mlp_layernorm,
        mlp=layer.mlp,
    )


def parse_olmoe_config(values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
    """An OLMoE config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    reader = ConfigReader(values, _WHERE)
    refuse_sliding_window(reader)
    refuse_clip_qkv(reader)
    refuse_attention_bias(reader)
    info = read_gpt_moe_info(reader, dtype, model_type="olmoe", architecture=_HF_CLASS,
                             experts_key="num_experts", expert_ffn_key="intermediate_size",
                             normalize_topk=None, described_fields=_DESCRIBED)
    check_olmo_head_dim(info.config, _WHERE)
    return info


def export_olmoe_config(config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
    """An OLMoE config.json mapping for a protoformer model built by `olmoe_layer_spec`."""
    problems = gpt_moe_exportable_problems(config)
    if config.num_moe_experts is not None:
        if config.qk_layernorm or config.add_qkv_bias:
            problems.append("per-head q/k norms or a q/k/v bias (OLMoE normalizes the whole "
                            "projection and has no bias)")
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            problems.append("head_dim * num_attention_heads != hidden_size")
        if not all(config.moe_layer_pattern):
            problems.append("dense layers (every OLMoE layer has experts)")
        if config.moe_shared_expert_intermediate_size is not None:
            problems.append("shared experts (OLMoE has none)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {_HF_CLASS}: "
                                      + "; ".join(problems))
    values = gpt_moe_config_values(config, sizes, model_type="olmoe", hf_class=_HF_CLASS)
    del values["head_dim"]  # transformers derives it (and sizes the q/k norms) from the heads
    values.update({
        "intermediate_size": config.moe_ffn_size,
        "num_experts": config.num_moe_experts,
        "norm_topk_prob": config.moe_normalizes_topk_probs,
        "attention_bias": False,
        "clip_qkv": None,
    })
    return values


class OlmoeArchitecture:
    """OLMoE (`CausalLMArchitecture`): `olmoe_layer_spec` with experts in every layer."""

    model_type = "olmoe"
    hf_class = _HF_CLASS
    exports_by_default = False  # the whole-projection q/k norms are not in the config

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_olmoe_config(values, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        return moe_layer_specs(backend, info.config, olmoe_layer_spec)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return model_rules(info, olmo_attention_rules, moe_layer_rules(ExpertNames()))

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_olmoe_config(config, sizes)


register_architecture(OlmoeArchitecture())
