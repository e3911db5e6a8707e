"""FlexAttention path of `SDPAttention` (CUDA): soft-capped and sliding causal layers against
the explicit math of `DotProductAttention`, forward and backward; the CPU keeps SDPA / math."""

from __future__ import annotations

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.transformer import flex_attention as flex_module
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention runs on CUDA")


def _config(cap: float | None) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=8,
                             num_query_groups=2, attention_dropout=0.0, softmax_scale=0.2,
                             attn_logit_softcapping=cap)


def _count_flex_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = flex_module.flex_causal_attention

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("protoformer.transformer.core_attention.flex_causal_attention", counting)
    return calls


def test_the_cpu_never_takes_the_flex_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_flex_calls(monkeypatch)
    core = SDPAttention(_config(1.5), 1, AttnMaskType.causal, window_size=4)
    q, k, v = (torch.randn(9, 2, n, 64) for n in (8, 2, 2))
    core(q, k, v, None)
    assert calls == []


@needs_cuda
@pytest.mark.parametrize(("cap", "window", "sq", "sk", "dtype", "tol"), [
    (2.0, None, 256, 256, torch.float32, 2e-5),
    (None, 64, 256, 256, torch.float32, 2e-5),
    (2.0, 100, 300, 300, torch.float32, 2e-5),
    (2.0, 64, 128, 320, torch.float32, 2e-5),  # queries continue a longer key sequence
    (50.0, 128, 512, 512, torch.bfloat16, 3e-2),
])
def test_flex_matches_the_math_path(monkeypatch: pytest.MonkeyPatch, cap: float | None,
                                    window: int | None, sq: int, sk: int, dtype: torch.dtype,
                                    tol: float) -> None:
    calls = _count_flex_calls(monkeypatch)
    config = _config(cap)
    fused = SDPAttention(config, 1, AttnMaskType.causal, window_size=window)
    reference = DotProductAttention(config, 1, AttnMaskType.causal, window_size=window)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(s, 2, n, 64, device="cuda", generator=generator).mul(3).to(dtype)
               .requires_grad_() for s, n in ((sq, 8), (sk, 2), (sk, 2)))
    grad = torch.randn(sq, 2, 8 * 64, device="cuda", generator=generator).to(dtype)

    got = fused(q, k, v, None)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    expected = reference(q.double(), k.double(), v.double(), None)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad.double())

    assert calls == [1]
    # Relative to the largest value, as the gradients: on an H200 (torch 2.11) fp32 outputs
    # near 8 differ by 6e-5 and bf16 ones by one bf16 step (0.03) from the float64 reference.
    for mine, theirs in zip((got, *got_grads), (expected, *expected_grads), strict=True):
        scale = theirs.abs().max().item()
        assert (mine.double() - theirs).abs().max().item() < tol * max(1.0, scale)


@needs_cuda
def test_padding_masks_keep_the_sdpa_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_flex_calls(monkeypatch)
    core = SDPAttention(_config(1.5), 1, AttnMaskType.padding_causal, window_size=4)
    q, k, v = (torch.randn(9, 2, n, 64, device="cuda") for n in (8, 2, 2))
    padding = torch.zeros(2, 1, 1, 9, dtype=torch.bool, device="cuda")
    padding[1, ..., :3] = True
    core(q, k, v, padding)
    assert calls == []


def test_a_flex_failure_is_warned_once_and_the_math_path_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no Triton here")

    monkeypatch.setattr("protoformer.transformer.core_attention.flex_attention_available",
                        lambda *args: True)
    monkeypatch.setattr("protoformer.transformer.core_attention.flex_causal_attention", broken)
    monkeypatch.setattr(SDPAttention, "flex_failed", False)
    config = _config(1.5)
    core = SDPAttention(config, 1, AttnMaskType.causal, window_size=4)
    q, k, v = (torch.randn(9, 2, n, 64) for n in (8, 2, 2))
    with pytest.warns(UserWarning, match="FlexAttention failed"):
        got = core(q, k, v, None)
    expected = DotProductAttention(config, 1, AttnMaskType.causal, window_size=4)(q, k, v, None)
    assert (got - expected).abs().max().item() < 1e-5
    assert SDPAttention.flex_failed
