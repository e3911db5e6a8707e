"""`config.fp8`: float8 training matmuls in the fused backend's linears (torchao).

On the CPU the fp8 linears must be the local linears exactly, without importing torchao; on
a GPU with float8 matmuls and torchao, `fp8_linear` must match a float64 reference to float8
precision (forward and both gradients) and a fused-backend model's loss must stay close to
its bf16 loss."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from protoformer import TransformerConfig
from protoformer.backends import LocalSpecProvider
from protoformer.backends.fused import (
    Fp8ColumnParallelLinear,
    Fp8RowParallelLinear,
    FusedSpecProvider,
)
from protoformer.kernels.fp8 import fp8_linear, fp8_training_available
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec

needs_fp8 = pytest.mark.skipif(not fp8_training_available(),
                               reason="needs a GPU with float8 matmuls and torchao")


def small_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=128, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, attention_dropout=0.0,
        hidden_dropout=0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def test_fp8_must_name_a_known_recipe() -> None:
    with pytest.raises(ValueError, match="fp8"):
        small_config(fp8="mxfp8")
    assert small_config(fp8="rowwise").fp8 == "rowwise"


def test_fused_backend_builds_fp8_linears() -> None:
    backend = FusedSpecProvider()
    assert backend.column_parallel_linear() is Fp8ColumnParallelLinear
    assert backend.row_parallel_linear() is Fp8RowParallelLinear


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_fp8_on_cpu_is_the_local_linear_and_never_imports_torchao() -> None:
    config = small_config(fp8="tensorwise")
    torch.manual_seed(0)
    fused = GPTModel(config, gpt_layer_spec(FusedSpecProvider(), config), 97, 32)
    plain = dataclasses.replace(config, fp8=None)
    torch.manual_seed(0)
    local = GPTModel(plain, gpt_layer_spec(LocalSpecProvider(), plain), 97, 32)
    ids = torch.randint(0, 97, (2, 16))
    loss_fused = fused(ids, ids).mean()
    loss_local = local(ids, ids).mean()
    assert torch.equal(loss_fused, loss_local)
    loss_fused.backward()
    loss_local.backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), local.named_parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.equal(a.grad, b.grad), name
    assert not fp8_training_available()
    assert not any(name == "torchao" or name.startswith("torchao.") for name in sys.modules)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@needs_fp8
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_matches_a_float64_reference(recipe: str) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 256, 512, device="cuda", generator=generator, dtype=torch.bfloat16)
    weight = torch.randn(384, 512, device="cuda", generator=generator, dtype=torch.bfloat16)
    bias = torch.randn(384, device="cuda", generator=generator, dtype=torch.bfloat16)
    grad = torch.randn(4, 256, 384, device="cuda", generator=generator, dtype=torch.bfloat16)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = fp8_linear(x, weight, bias, recipe)  # type: ignore[arg-type]
    out.backward(grad)
    x64, w64 = x.detach().double(), weight.detach().double()
    ref = x64 @ w64.t() + bias.double()
    assert out.dtype == torch.bfloat16 and out.shape == (4, 256, 384)
    # e4m3 keeps 3 mantissa bits: a few percent of relative error, far below a wrong result.
    assert _relative(out, ref) < 0.08
    assert x.grad is not None and weight.grad is not None
    assert _relative(x.grad, grad.double() @ w64) < 0.12  # e5m2 gradients: 2 mantissa bits
    assert _relative(weight.grad, grad.double().reshape(-1, 384).t() @ x64.reshape(-1, 512)) < 0.12


@needs_fp8
def test_fp8_model_loss_stays_close_to_bf16() -> None:
    config = small_config(hidden_size=256, ffn_hidden_size=512, params_dtype=torch.bfloat16,
                          bf16=True)
    losses = {}
    for recipe in (None, "tensorwise", "rowwise"):
        variant = dataclasses.replace(config, fp8=recipe)
        torch.manual_seed(0)
        model = GPTModel(variant, gpt_layer_spec(FusedSpecProvider(), variant), 512, 128).cuda()
        ids = torch.randint(0, 512, (4, 128), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(1))
        losses[recipe] = float(model(ids, ids).mean())
    assert abs(losses["tensorwise"] - losses[None]) / losses[None] < 0.02
    assert abs(losses["rowwise"] - losses[None]) / losses[None] < 0.02
