"""Sliding-window core attention against a loop over queries, and its option checks."""

from __future__ import annotations

import math

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType


def loop_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                   blocked_keys: torch.Tensor | None) -> torch.Tensor:
    """`[sq, b, np, hn]`, `[sk, b, ng, hn]` -> `[sq, b, np * hn]`, one query at a time."""
    sq, batch, heads, hn = q.shape
    sk, groups = k.shape[0], k.shape[2]
    out = torch.zeros(sq, batch, heads, v.shape[3], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for i in range(sq):
                position = i + sk - sq
                keys = [j for j in range(sk) if position - window < j <= position
                        and (blocked_keys is None or not blocked_keys[b, j])]
                if not keys:
                    continue
                scores = torch.stack([q[i, b, h].double() @ k[j, b, g].double() for j in keys])
                probs = torch.softmax(scores / math.sqrt(hn), dim=0)
                out[i, b, h] = sum(p * v[j, b, g].double() for p, j in zip(probs, keys, strict=True))
    return out.reshape(sq, batch, heads * v.shape[3])


@pytest.mark.parametrize("core_class", [DotProductAttention, SDPAttention])
@pytest.mark.parametrize(("sq", "sk"), [(10, 10), (3, 10), (1, 10), (10, 4)])
def test_window_matches_a_loop(core_class: type[DotProductAttention], sq: int, sk: int) -> None:
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, attention_dropout=0.0)
    core = core_class(config, 1, AttnMaskType.padding_causal, window_size=3).eval()
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(sq, 2, 4, 8, generator=generator)
    k = torch.randn(sk, 2, 2, 8, generator=generator)
    v = torch.randn(sk, 2, 2, 8, generator=generator)
    padding = torch.zeros(2, sk, dtype=torch.bool)
    padding[1, :2] = True  # two left-padding keys in the second row
    got = core(q, k, v, padding[:, None, None, :])
    expected = loop_reference(q, k, v, 3, padding)
    assert (got.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("window", [0, -1, 2.5, True, "4"])
def test_a_bad_window_is_refused_with_its_value(window: object) -> None:
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"SDPAttention\(window_size=.*int >= 1"):
        SDPAttention(config, 1, AttnMaskType.causal, window_size=window)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]  # the bad value under test
