"""Qwen2-MoE and Qwen3-MoE (`Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`) <-> protoformer's GPT
layers with `MoELayer`s.

Config: Qwen2/Qwen3 attention (Qwen2-MoE: a q/k/v bias, `qkv_bias`; Qwen3-MoE: per-head q/k
RMSNorm), `num_experts` SwiGLU experts of width `moe_intermediate_size` picked by a softmax
router (`norm_topk_prob` renormalises the top-k weights, else `moe_router_pre_softmax`).
Layer i has experts unless it is in `mlp_only_layers`, and only when
`(i + 1) % decoder_sparse_step == 0`; the other layers have a dense MLP of
`intermediate_size` (one layer spec per layer). Qwen2-MoE adds a shared expert of width
`shared_expert_intermediate_size` scaled by `sigmoid(shared_expert_gate(x))`
(`moe_shared_expert_gate`).

Refused: sliding-window attention (`use_sliding_window`), Qwen3-MoE's `attention_bias` (a
bias on o_proj but not on the experts).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from protoformer.architectures.conversion import (
    ConfigReader,
    HFModelInfo,
    JSONDict,
    TensorRule,
    UnsupportedHFModelError,
    model_rules,
)
from protoformer.architectures.llama import dense_attention_rules
from protoformer.architectures.moe_conversion import (
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
from protoformer.recipes.moe import gpt_moe_layer_specs
from protoformer.transformer.block import LayerSpecs

__all__ = ["QwenMoeArchitecture"]

_HF_CLASSES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def parse_qwen_moe_config(values: Mapping[str, object], model_type: str,
                          dtype: torch.dtype) -> HFModelInfo:
    """A Qwen2-MoE or Qwen3-MoE config.json mapping -> `HFModelInfo` (parameters in `dtype`)."""
    hf_class = _HF_CLASSES[model_type]
    reader = ConfigReader(values, f"{hf_class} config")
    refuse_sliding_window(reader, switch="use_sliding_window")
    qwen2 = model_type == "qwen2_moe"
    if not qwen2:
        refuse_attention_bias(reader)
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
    experts_key = "num_experts" if reader.present("num_experts") else "num_local_experts"
    return read_gpt_moe_info(
        reader, dtype, model_type=model_type, architecture=hf_class, experts_key=experts_key,
        expert_ffn_key="moe_intermediate_size", normalize_topk=None, every_layer=False,
        qk_layernorm=not qwen2, add_qkv_bias=qwen2 and reader.get_bool("qkv_bias", True),
        shared_expert_key="shared_expert_intermediate_size" if qwen2 else None)


def export_qwen_moe_config(config: TransformerConfig, sizes: ModelSizes,
                           model_type: str) -> JSONDict:
    """A Qwen2-MoE/Qwen3-MoE config.json mapping for a protoformer MoE model, or the reasons
    it is not one."""
    hf_class = _HF_CLASSES[model_type]
    qwen2 = model_type == "qwen2_moe"
    problems = gpt_moe_exportable_problems(config)
    if config.num_moe_experts is not None:
        if config.qk_layernorm == qwen2:
            problems.append(f"qk_layernorm={config.qk_layernorm} ({hf_class} "
                            f"{'has no' if qwen2 else 'has'} per-head q/k norms)")
        if config.add_qkv_bias and not qwen2:
            problems.append("add_qkv_bias=True (Qwen3-MoE has no q/k/v bias alone)")
        shared = config.moe_shared_expert_intermediate_size is not None
        if qwen2 and not (shared and config.moe_shared_expert_gate):
            problems.append("no gated shared expert (Qwen2-MoE's layers have one, scaled by "
                            "shared_expert_gate)")
        if not qwen2 and shared:
            problems.append("shared experts (Qwen3-MoE has none)")
    if problems:
        raise UnsupportedHFModelError(f"cannot export this model as {hf_class}: "
                                      + "; ".join(problems))
    values = gpt_moe_config_values(config, sizes, model_type=model_type, hf_class=hf_class)
    values.update({
        "intermediate_size": config.ffn_size,
        "moe_intermediate_size": config.moe_ffn_size,
        "num_experts": config.num_moe_experts,
        "norm_topk_prob": config.moe_normalizes_topk_probs,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(config.moe_layer_pattern) if not moe],
        "use_sliding_window": False,
        "sliding_window": None,
    })
    if qwen2:
        values["shared_expert_intermediate_size"] = config.moe_shared_expert_intermediate_size
        values["qkv_bias"] = config.add_qkv_bias
    else:
        values["attention_bias"] = False
    return values


class QwenMoeArchitecture:
    """Qwen2-MoE or Qwen3-MoE (`CausalLMArchitecture`): `gpt_moe_layer_specs`, one spec per
    layer (dense or MoE)."""

    exports_by_default = True

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type
        self.hf_class = _HF_CLASSES[model_type]
        shared = ("shared_expert", "shared_expert_gate") if model_type == "qwen2_moe" else (None, None)
        self._mlp_rules = moe_layer_rules(ExpertNames(), shared=shared[0], shared_gate=shared[1])

    def read_config(self, values: Mapping[str, object], dtype: torch.dtype) -> HFModelInfo:
        return parse_qwen_moe_config(values, self.model_type, dtype)

    def layer_spec(self, backend: BackendSpecProvider, info: HFModelInfo) -> LayerSpecs:
        return gpt_moe_layer_specs(backend, info.config)

    def tensor_rules(self, info: HFModelInfo) -> list[TensorRule]:
        return model_rules(info, dense_attention_rules, self._mlp_rules)

    def write_config(self, config: TransformerConfig, sizes: ModelSizes) -> JSONDict:
        return export_qwen_moe_config(config, sizes, self.model_type)


for _model_type in _HF_CLASSES:
    register_architecture(QwenMoeArchitecture(_model_type))
