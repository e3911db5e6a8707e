"""Mixture-of-experts presets of published shapes: Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 (671B, multi-latent attention + MoE), for
`inspect`, FLOP counts and weight loading. Layer specs come from `recipes.moe`: dense or MoE
per `moe_layer_freq` (DeepSeek-V3's first three layers are dense)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protoformer.config import MLATransformerConfig, TransformerConfig
from protoformer.recipes.moe import gpt_moe_layer_specs, mla_moe_layer_specs
from protoformer.recipes.presets import Preset, register_preset

__all__: list[str] = []


def _mixtral_8x7b() -> TransformerConfig:
    return TransformerConfig(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, normalization="RMSNorm", add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, attention_dropout=0.0,
        hidden_dropout=0.0, rotary_base=1e6, params_dtype=torch.bfloat16, bf16=True,
        num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=14336,
        moe_aux_loss_coeff=1e-2,
    )


def _qwen3_30b_a3b() -> TransformerConfig:
    return TransformerConfig(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
        kv_channels=128, ffn_hidden_size=6144, normalization="RMSNorm", layernorm_epsilon=1e-6,
        qk_layernorm=True, add_bias_linear=False, gated_linear_unit=True,
        activation_func=F.silu, attention_dropout=0.0, hidden_dropout=0.0, rotary_base=1e6,
        params_dtype=torch.bfloat16, bf16=True,
        num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
        moe_aux_loss_coeff=1e-3,  # norm_topk_prob=true: softmax, top-k renormalised
    )


def _deepseek_v3() -> TransformerConfig:
    return MLATransformerConfig(
        num_layers=61, hidden_size=7168, num_attention_heads=128, ffn_hidden_size=18432,
        q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
        v_head_dim=128, normalization="RMSNorm", layernorm_epsilon=1e-6, add_bias_linear=False,
        gated_linear_unit=True, activation_func=F.silu, attention_dropout=0.0,
        hidden_dropout=0.0, rotary_base=10000.0, rope_type="yarn", rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
        mscale_all_dim=1.0, params_dtype=torch.bfloat16, bf16=True,
        num_moe_experts=256, moe_router_topk=8, moe_ffn_hidden_size=2048,
        moe_layer_freq=[0] * 3 + [1] * 58, moe_shared_expert_intermediate_size=2048,
        moe_router_score_function="sigmoid", moe_router_num_groups=8, moe_router_group_topk=4,
        moe_router_topk_scaling_factor=2.5, moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3, moe_router_dtype="fp32", moe_aux_loss_coeff=1e-4,
    )


register_preset(Preset(
    "mixtral-8x7b", "Mixtral 8x7B shapes (32 layers, hidden 4096, GQA 32/8, 8 SwiGLU experts of "
    "14336, top-2, vocab 32000)", _mixtral_8x7b, vocab_size=32000, max_sequence_length=32768,
    layer_spec=gpt_moe_layer_specs, tie_embeddings=False))
register_preset(Preset(
    "qwen3-30b-a3b", "Qwen3-30B-A3B shapes (48 layers, hidden 2048, GQA 32/4 of 128, q/k norm, "
    "128 experts of 768, top-8, vocab 151936)", _qwen3_30b_a3b, vocab_size=151936,
    max_sequence_length=40960, layer_spec=gpt_moe_layer_specs, tie_embeddings=False))
register_preset(Preset(
    "deepseek-v3", "DeepSeek-V3 671B shapes (61 layers, MLA, first 3 dense, then 256 routed "
    "experts of 2048 top-8 with sigmoid group-limited routing + 1 shared expert)", _deepseek_v3,
    vocab_size=129280, max_sequence_length=163840, layer_spec=mla_moe_layer_specs,
    tie_embeddings=False))
