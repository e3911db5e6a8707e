"""MLP and Activation against naive formulas written with the layer's own weights."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.spec import SpecError, check_builder
from protoformer.transformer.mlp import (
    MLP,
    Activation,
    ActivationBuilder,
    MLPBuilder,
    MLPSubmodules,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
                                 "ffn_hidden_size": 24, "hidden_dropout": 0.0}
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def local_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear,
                         activation=Activation)


def randomize(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def naive_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, *,
              act: str, gated: bool) -> Tensor:
    """y = W2 f(W1 x + b1) + b2, written element by element with explicit gate/up halves."""
    h = torch.einsum("sbi,oi->sbo", x, w1)
    if b1 is not None:
        h = h + b1
    if gated:
        f = w1.shape[0] // 2
        gate, up = h[..., :f], h[..., f:]
        if act == "silu":
            h = gate * torch.sigmoid(gate) * up
        else:  # exact (erf) gelu
            h = 0.5 * gate * (1.0 + torch.erf(gate / 2.0**0.5)) * up
    elif act == "gelu":
        h = 0.5 * h * (1.0 + torch.erf(h / 2.0**0.5))
    else:
        h = h * torch.sigmoid(h)
    y = torch.einsum("sbf,of->sbo", h, w2)
    return y if b2 is None else y + b2


@pytest.mark.parametrize(
    ("act", "gated", "bias"),
    [("silu", True, False), ("gelu", True, True), ("gelu", False, True), ("silu", False, False)],
    ids=["swiglu", "geglu-bias", "gelu-bias", "silu"],
)
def test_mlp_matches_naive_formula(act: str, gated: bool, bias: bool) -> None:
    func = F.silu if act == "silu" else F.gelu
    config = make_config(gated_linear_unit=gated, activation_func=func, add_bias_linear=bias)
    mlp = MLP(config, local_submodules())
    randomize(mlp)
    x = torch.randn(5, 3, 16)

    out, out_bias = mlp(x)

    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    assert isinstance(fc1, ColumnParallelLinear) and isinstance(fc2, RowParallelLinear)
    assert fc1.weight is not None
    assert tuple(fc1.weight.shape) == ((48 if gated else 24), 16)
    assert tuple(fc2.weight.shape) == (16, 24)
    expected = naive_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act=act, gated=gated)
    assert out.shape == (5, 3, 16)
    if bias:
        assert out_bias is not None and out_bias.shape == (16,)  # returned for a fused add
        out = out + out_bias
    else:
        assert out_bias is None
    torch.testing.assert_close(out, expected, **TOL)


def test_mlp_input_size_overrides_hidden_size_on_the_input_side() -> None:
    config = make_config(add_bias_linear=False)
    mlp = MLP(config, local_submodules(), input_size=10)
    out, _ = mlp(torch.randn(2, 1, 10))
    assert out.shape == (2, 1, 16)


def test_mlp_gradients_match_naive_formula() -> None:
    config = make_config(gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False)
    mlp = MLP(config, local_submodules())
    randomize(mlp, seed=3)
    x = torch.randn(4, 2, 16, requires_grad=True)
    out, _ = mlp(x)
    out.square().sum().backward()
    assert x.grad is not None
    got = x.grad.clone()

    fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
    assert isinstance(fc1, ColumnParallelLinear) and isinstance(fc2, RowParallelLinear)
    assert fc1.weight is not None
    x2 = x.detach().clone().requires_grad_(True)
    naive_mlp(x2, fc1.weight.detach(), None, fc2.weight.detach(), None, act="silu",
              gated=True).square().sum().backward()
    assert x2.grad is not None
    torch.testing.assert_close(got, x2.grad, **TOL)


def test_activation_gated_takes_gate_then_up_halves() -> None:
    act = Activation(make_config(activation_func=F.relu), gated=True)
    x = torch.tensor([[-1.0, 2.0, 10.0, 20.0]])  # gate = [-1, 2], up = [10, 20]
    torch.testing.assert_close(act(x), torch.tensor([[0.0, 40.0]]))


def test_activation_plain_preserves_shape_and_gated_rejects_odd_width() -> None:
    config = make_config(activation_func=F.relu)
    x = torch.tensor([[-1.0, 2.0, 3.0]])
    torch.testing.assert_close(Activation(config, gated=False)(x), torch.tensor([[0.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="even last dimension"):
        Activation(config, gated=True)(x)


def test_activation_and_mlp_satisfy_their_builder_protocols() -> None:
    check_builder(Activation, ActivationBuilder)
    check_builder(functools.partial(MLP, submodules=local_submodules()), MLPBuilder)


def test_mlp_submodules_rejects_column_parallel_linear_as_fc2() -> None:
    with pytest.raises(SpecError, match=r"(?s)MLPSubmodules\.linear_fc2.*input_is_parallel"):
        MLPSubmodules(linear_fc1=ColumnParallelLinear,
                      linear_fc2=ColumnParallelLinear,  # type: ignore[arg-type]
                      activation=Activation)


def test_mlp_rejects_wrong_submodules_record() -> None:
    with pytest.raises(TypeError, match="MLPSubmodules"):
        MLP(make_config(), object())  # type: ignore[arg-type]


def test_mlp_backward_dw_computes_deferred_weight_gradients() -> None:
    torch.manual_seed(0)
    eager = MLP(make_config(add_bias_linear=False), local_submodules())
    delayed = MLP(make_config(add_bias_linear=False, delay_wgrad_compute=True), local_submodules())
    delayed.load_state_dict(eager.state_dict())
    x = torch.randn(3, 2, 16)
    for mlp in (eager, delayed):
        mlp(x)[0].sum().backward()
    delayed.backward_dw()
    for (name, p_eager), p_delayed in zip(eager.named_parameters(), delayed.parameters(),
                                          strict=True):
        assert p_eager.grad is not None and p_delayed.grad is not None, name
        torch.testing.assert_close(p_delayed.grad, p_eager.grad, **TOL)
