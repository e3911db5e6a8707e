"""Attention-logit and final-logit soft-capping (Gemma 2) against loops written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.backends import LocalSpecProvider
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType

CAP = 1.5


def loop_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   window: int, blocked_keys: torch.Tensor) -> torch.Tensor:
    """`[s, b, np, hn]`, `[s, b, ng, hn]` -> `[s, b, np * hn]`: per query, scores of the keys
    it may see, `CAP * tanh(score / CAP)`, softmax, weighted values."""
    s, batch, heads, hn = q.shape
    groups = k.shape[2]
    out = torch.zeros(s, batch, heads, hn, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            for i in range(s):
                keys = [j for j in range(s) if i - window < j <= i and not blocked_keys[b, j]]
                if not keys:
                    continue
                raw = [float(q[i, b, h].double() @ k[j, b, g].double()) * scale for j in keys]
                capped = torch.tensor([CAP * math.tanh(x / CAP) for x in raw], dtype=torch.float64)
                probs = torch.softmax(capped, dim=0)
                out[i, b, h] = sum(p * v[j, b, g].double() for p, j in zip(probs, keys, strict=True))
    return out.reshape(s, batch, heads * hn)


@pytest.mark.parametrize("core_class", [DotProductAttention, SDPAttention])
def test_softcapped_attention_matches_a_loop(core_class: type[DotProductAttention]) -> None:
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2, attention_dropout=0.0, softmax_scale=0.3,
                               attn_logit_softcapping=CAP)
    core = core_class(config, 1, AttnMaskType.padding_causal, window_size=4).eval()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, 2, n, 8, generator=generator) * 2 for n in (4, 2, 2))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, :3] = True
    got = core(q, k, v, padding[:, None, None, :])
    expected = loop_reference(q, k, v, scale=0.3, window=4, blocked_keys=padding)
    real = ~padding.T[:, :, None].expand(9, 2, 32)
    assert (got.double() - expected).abs()[real].max().item() < 1e-5
    # Guard: the cap changes these scores (|score| reaches well past CAP).
    core.attn_logit_softcapping = None
    assert (core(q, k, v, padding[:, None, None, :]).double() - expected).abs()[real].max() > 1e-2


def test_final_logits_are_softcapped_in_output_and_loss() -> None:
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               attention_dropout=0.0, hidden_dropout=0.0, init_method_std=0.5,
                               final_logit_softcapping=2.0)
    torch.manual_seed(0)
    model = GPTModel(config, gpt_layer_spec(LocalSpecProvider(), config), 50, 16).eval()
    ids = torch.randint(0, 50, (2, 7))
    logits = model(ids)
    model.config.final_logit_softcapping = None
    raw = model(ids)
    assert raw.abs().max() > 3.0  # the cap matters here
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-6)
    model.config.final_logit_softcapping = 2.0
    loss = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(),
                                                 reduction="none").view(2, 7)
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), True, "30"])
def test_a_bad_cap_is_refused(cap: object) -> None:
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                          attn_logit_softcapping=cap)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]  # the bad value under test


def test_t5_refuses_a_final_logit_cap_it_would_not_apply() -> None:
    from protoformer.models import T5Model
    from protoformer.recipes.t5 import t5_decoder_layer_spec, t5_encoder_layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               final_logit_softcapping=30.0)
    backend = LocalSpecProvider()
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        T5Model(config, t5_encoder_layer_spec(backend, config),
                t5_decoder_layer_spec(backend, config), 50, 16)
