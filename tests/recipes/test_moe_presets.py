"""MoE presets: total parameters equal transformers' models built on the meta device from the
published configs (values written here), active parameters and FLOPs count the routed top-k."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from protoformer.flops import flops_per_token, inactive_expert_params, matmul_params
from protoformer.recipes import get_preset, list_presets
from protoformer.transformer.mlp import MLP
from protoformer.transformer.moe import MoELayer

transformers = pytest.importorskip("transformers")

# Published configs (config.json of each checkpoint), the fields that set parameter shapes.
DEEPSEEK_V3: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
QWEN3_30B_A3B: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "tie_word_embeddings": False,
}
MIXTRAL_8X7B: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False,
}


def hf_meta_params(config_class: str, model_class: str, values: dict[str, Any]) -> int:
    config = getattr(transformers, config_class)(**values)
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("preset", "config_class", "model_class", "values"), [
    ("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK_V3),
    ("qwen3-30b-a3b", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", QWEN3_30B_A3B),
    ("mixtral-8x7b", "MixtralConfig", "MixtralForCausalLM", MIXTRAL_8X7B),
])
def test_total_parameters_equal_transformers_meta_build(
        preset: str, config_class: str, model_class: str, values: dict[str, Any]) -> None:
    model = get_preset(preset).build_model(device="meta")
    ours = sum(p.numel() for p in model.parameters())
    assert ours == hf_meta_params(config_class, model_class, values)


def test_deepseek_v3_layers_first_three_dense_then_moe_and_builds_fast() -> None:
    preset = get_preset("deepseek-v3")
    preset.build_model(device="meta")  # first build pays one-time imports
    started = time.perf_counter()
    model = preset.build_model(device="meta")
    elapsed = time.perf_counter() - started
    kinds = [type(layer.mlp) for layer in model.decoder.layers]  # type: ignore[union-attr]
    assert kinds == [MLP] * 3 + [MoELayer] * 58
    assert elapsed < 10  # ~0.3 s on an idle 2-core machine; generous for a loaded CI box
    total = sum(p.numel() for p in model.parameters())
    active = total - inactive_expert_params(preset.config())
    assert round(total / 1e9) == 671 and round(active / 1e9) == 38  # "671B total, 37B activated"


def test_active_flops_count_routed_topk_not_all_experts() -> None:
    config = get_preset("mixtral-8x7b").config()
    dense_equivalent = get_preset("mixtral-8x7b").config()
    dense_equivalent.num_moe_experts = None  # every layer a dense MLP of the same width
    # An MoE layer costs its router plus top-2 experts: 2x the dense MLP, plus h * E.
    extra = matmul_params(config, 32000) - matmul_params(dense_equivalent, 32000)
    assert extra == 32 * (3 * 4096 * 14336 + 4096 * 8)
    assert flops_per_token(config, 32000, 4096) - flops_per_token(dense_equivalent, 32000, 4096) \
        == 6 * extra


def test_moe_presets_are_listed() -> None:
    assert {"tiny-moe", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"} <= set(list_presets())
