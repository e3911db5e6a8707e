"""`ProjectionRMSNorm`: one RMS norm over all heads of a query/key projection (OLMoE)."""

from __future__ import annotations

import functools

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.spec import check_builder
from protoformer.transformer.norm import LayerNormBuilder
from protoformer.transformer.projection_norm import ProjectionRMSNorm

CONFIG = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=3)


def test_normalizes_all_heads_together_with_one_scale_per_feature() -> None:
    norm = ProjectionRMSNorm(8, config=CONFIG, eps=1e-5, num_heads=3)
    assert norm.weight.shape == (24,)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(5, 2, 3, 8, generator=torch.Generator().manual_seed(0))  # [s, b, n, hn]
    flat = x.reshape(5, 2, 24)
    expected = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected.reshape(x.shape), rtol=1e-6, atol=1e-6)
    per_head = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert not torch.allclose(norm(x), per_head * norm.weight.view(3, 8), atol=1e-3)


def test_fills_a_qk_norm_slot_and_refuses_split_heads() -> None:
    builder: LayerNormBuilder = functools.partial(ProjectionRMSNorm, num_heads=3)
    check_builder(builder, LayerNormBuilder, slot="q_layernorm")
    norm = builder(8, config=CONFIG, eps=1e-6)
    with pytest.raises(ValueError, match="every head of the projection on this rank"):
        norm(torch.randn(4, 1, 2, 8))  # two of the three heads, as one tensor-parallel rank has
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        ProjectionRMSNorm(8, config=CONFIG, num_heads=0)
