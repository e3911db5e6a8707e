"""LayerNorm / RMSNorm against the closed-form formulas, and their fit to LayerNormBuilder."""

from __future__ import annotations

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.spec import check_builder
from protoformer.transformer.norm import (
    LayerNorm,
    LayerNormBuilder,
    RMSNorm,
    norm_class,
)


def make_config(**overrides: object) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, **overrides)  # type: ignore[arg-type]


def naive_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + eps) * weight.double()


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_matches_formula(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = LayerNorm(16, config=make_config(), eps=1e-5)
    randomize(norm)
    x = (torch.randn(5, 3, 16) * 3 + 1).to(dtype)
    out = norm(x)
    assert out.dtype == dtype and out.shape == x.shape
    want = naive_layer_norm(x, norm.weight, norm.bias, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_formula(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    norm = RMSNorm(16, config=make_config(), eps=1e-6)
    randomize(norm)
    x = (torch.randn(4, 2, 16) * 5).to(dtype)
    out = norm(x)
    assert out.dtype == dtype and out.shape == x.shape
    want = naive_rms_norm(x, norm.weight, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol * 4, rtol=tol)


def test_eps_is_used() -> None:
    x = torch.full((2, 8), 1e-3)
    big = RMSNorm(8, config=make_config(), eps=1.0)(x)
    torch.testing.assert_close(big, naive_rms_norm(x, torch.ones(8), 1.0).float())
    ln = LayerNorm(8, config=make_config(), eps=0.5)
    y = torch.randn(3, 8)
    torch.testing.assert_close(ln(y), naive_layer_norm(y, ln.weight, ln.bias, 0.5).float())


def test_parameters_use_params_dtype_and_layer_norm_has_bias() -> None:
    config = make_config(params_dtype=torch.bfloat16)
    ln = LayerNorm(16, config=config)
    rms = RMSNorm(16, config=config)
    assert ln.weight.dtype == ln.bias.dtype == rms.weight.dtype == torch.bfloat16
    assert [name for name, _ in rms.named_parameters()] == ["weight"]
    assert sorted(name for name, _ in ln.named_parameters()) == ["bias", "weight"]
    # A float32 input is normalized with bf16 parameters and stays float32.
    assert ln(torch.randn(2, 16)).dtype == torch.float32


def test_default_eps() -> None:
    assert LayerNorm(4, config=make_config()).eps == 1e-5
    assert RMSNorm(4, config=make_config()).eps == 1e-6


def test_norm_class_follows_config() -> None:
    assert norm_class(make_config(normalization="LayerNorm")) is LayerNorm
    assert norm_class(make_config(normalization="RMSNorm")) is RMSNorm


def test_both_satisfy_layer_norm_builder_at_runtime() -> None:
    check_builder(LayerNorm, LayerNormBuilder)
    check_builder(RMSNorm, LayerNormBuilder)
    built: LayerNormBuilder = RMSNorm  # the static checkers accept this assignment too
    assert isinstance(built(8, config=make_config(), eps=1e-6), RMSNorm)


def test_wrong_feature_size_is_a_clear_error() -> None:
    norm = RMSNorm(16, config=make_config())
    with pytest.raises(ValueError, match=r"last dimension must be 16"):
        norm(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="hidden_size"):
        LayerNorm(0, config=make_config())


def test_rms_norm_matches_hugging_face_llama() -> None:
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(2)
    ours = RMSNorm(16, config=make_config(), eps=1e-6)
    theirs = LlamaRMSNorm(16, eps=1e-6)
    randomize(ours)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 2, 16)
    torch.testing.assert_close(ours(x), theirs(x))
