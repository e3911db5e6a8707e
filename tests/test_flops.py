"""flops_per_token against closed-form counts written out by hand in the test."""

import pytest

from protoformer import MLATransformerConfig, TransformerConfig
from protoformer.flops import flops_per_token


def test_flops_per_token_of_small_gqa_swiglu_model_matches_hand_count() -> None:
    # 2 layers, hidden 64, 4 heads of 16, 2 key/value groups, SwiGLU 96, vocab 100, seq 32.
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, ffn_hidden_size=96, gated_linear_unit=True)
    q = 64 * 64
    kv = 2 * 64 * 2 * 16
    proj = 64 * 64
    mlp = 3 * 64 * 96
    output = 64 * 100
    matmul_params = 2 * (q + kv + proj + mlp) + output
    attention = 2 * 3 * (2 * 32 * 64 + 2 * 32 * 64)  # layers * (fwd+bwd) * (QK^T + PV)
    assert flops_per_token(config, 100, 32) == 6 * matmul_params + attention
    # The causal count credits half of the attention matmuls.
    assert flops_per_token(config, 100, 32, causal=True) == 6 * matmul_params + attention // 2


def test_palm_count_is_6n_plus_12_l_h_s() -> None:
    # PaLM / torchtitan: 6 N + 12 L h s when head_dim * heads == hidden (here 22 x 2048 x 4096).
    config = TransformerConfig(num_layers=22, hidden_size=2048, num_attention_heads=32,
                               num_query_groups=4, ffn_hidden_size=5632, gated_linear_unit=True)
    n = 22 * (2048 * 2048 * 2 + 2 * 2048 * 256 + 3 * 2048 * 5632) + 2048 * 32000
    assert flops_per_token(config, 32000, 4096) == 6 * n + 12 * 22 * 2048 * 4096
    assert flops_per_token(config, 32000, 4096, causal=True) == 6 * n + 6 * 22 * 2048 * 4096


def test_flops_per_token_of_plain_gelu_mlp_counts_two_linears() -> None:
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    params = 4 * 8 * 8 + 2 * 8 * 32 + 8 * 10
    assert flops_per_token(config, 10, 4) == 6 * params + 3 * (2 * 4 * 8 * 2)


def test_flops_per_token_of_mla_counts_latent_projections() -> None:
    config = MLATransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                                  ffn_hidden_size=48, gated_linear_unit=True, q_lora_rank=8,
                                  kv_lora_rank=6, qk_head_dim=4, qk_pos_emb_head_dim=2,
                                  v_head_dim=5)
    q = 32 * 8 + 8 * 2 * (4 + 2)
    kv = 32 * (6 + 2) + 6 * 2 * (4 + 5)
    proj = 2 * 5 * 32
    mlp = 3 * 32 * 48
    params = q + kv + proj + mlp + 32 * 7
    attention = 3 * (2 * 3 * 2 * 6 + 2 * 3 * 2 * 5)  # seq 3, 2 heads, d_qk 6, d_v 5
    assert flops_per_token(config, 7, 3) == 6 * params + attention


@pytest.mark.parametrize(("vocab", "seq"), [(0, 4), (4, 0), (True, 4)])
def test_flops_per_token_rejects_non_positive_sizes(vocab: int, seq: int) -> None:
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"must be (an int )?>= 1"):
        flops_per_token(config, vocab, seq)
