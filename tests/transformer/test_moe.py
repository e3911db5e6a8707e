"""MoELayer numerics against an independent per-token loop, GroupedMLP vs SequentialMLP,
gradients, capacity dropping, auxiliary losses in closed form, and the expert-bias update."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.parallel import ColumnParallelLinear, RowParallelLinear
from protoformer.transformer.mlp import Activation, MLPSubmodules
from protoformer.transformer.moe import (
    ExpertActivation,
    GroupedLinear,
    GroupedMLP,
    GroupedMLPSubmodules,
    MoEAuxLossTracker,
    MoELayer,
    MoESubmodules,
    SequentialMLP,
    SharedExpertMLP,
    TopKRouter,
    bind_aux_loss_tracker,
)

H, E = 16, 8
DENSE_MLP = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear,
                          activation=Activation)


def make_config(**overrides: Any) -> TransformerConfig:
    base: dict[str, Any] = {
        "num_layers": 2, "hidden_size": H, "num_attention_heads": 2, "num_moe_experts": E,
        "moe_ffn_hidden_size": 12, "moe_router_topk": 2, "gated_linear_unit": True,
        "activation_func": F.silu, "add_bias_linear": False, "init_method_std": 0.2,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
    }
    base.update(overrides)
    return TransformerConfig(**base)


def make_layer(config: TransformerConfig, *, sequential: bool = False) -> MoELayer:
    experts = (functools.partial(SequentialMLP, submodules=DENSE_MLP) if sequential else
               functools.partial(GroupedMLP, submodules=GroupedMLPSubmodules(
                   linear_fc1=GroupedLinear, linear_fc2=GroupedLinear, activation=ExpertActivation)))
    shared = None
    if config.moe_shared_expert_intermediate_size is not None:
        shared = functools.partial(SharedExpertMLP, submodules=DENSE_MLP)
    return MoELayer(config, MoESubmodules(router=TopKRouter, experts=experts, shared_experts=shared))


def expert_weights(layer: MoELayer) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(fc1 [E, 2f, h], fc2 [E, h, f], fc1 bias, fc2 bias) of the layer's experts."""
    experts = layer.experts
    if isinstance(experts, GroupedMLP):
        fc1, fc2 = experts.linear_fc1, experts.linear_fc2
        assert isinstance(fc1, GroupedLinear) and isinstance(fc2, GroupedLinear)
        return fc1.weight, fc2.weight, fc1.bias, fc2.bias
    assert isinstance(experts, SequentialMLP)
    mlps = list(experts.local_experts)
    w1 = torch.stack([m.linear_fc1.weight for m in mlps])  # type: ignore[union-attr]
    w2 = torch.stack([m.linear_fc2.weight for m in mlps])  # type: ignore[union-attr]
    return w1, w2, None, None


# ---------------------------------------------------------------------------------------------
# The reference: one token at a time, written from the model papers / HF semantics.


def reference_route(logit: Tensor, config: TransformerConfig, bias: Tensor | None
                    ) -> tuple[list[int], list[Tensor]]:
    k = config.moe_router_topk
    if config.moe_router_score_function == "softmax":
        probs = torch.softmax(logit, dim=0)
        chosen = sorted(range(E), key=lambda e: -float(probs[e]))[:k]
        weights = [probs[e] for e in chosen]
        if not config.moe_router_pre_softmax:
            total = sum(weights)
            weights = [w / total for w in weights]
    else:
        scores = torch.sigmoid(logit)
        choice = (scores + (bias if bias is not None else 0.0)).detach()
        allowed = list(range(E))
        if config.moe_router_num_groups is not None:
            groups, per = config.moe_router_num_groups, E // config.moe_router_num_groups
            best = k // (config.moe_router_group_topk or 1)
            group_score = [sum(sorted((float(choice[g * per + i]) for i in range(per)),
                                      reverse=True)[:best]) for g in range(groups)]
            top_groups = sorted(range(groups), key=lambda g: -group_score[g])[
                :config.moe_router_group_topk]
            allowed = [e for e in range(E) if e // per in top_groups]
        chosen = sorted(allowed, key=lambda e: -float(choice[e]))[:k]
        weights = [scores[e] for e in chosen]
        if config.moe_normalizes_topk_probs:
            total = sum(weights)
            weights = [w / (total + 1e-20) for w in weights]
    scale = config.moe_router_topk_scaling_factor or 1.0
    return chosen, [w * scale for w in weights]


def reference_moe(x: Tensor, layer: MoELayer, config: TransformerConfig,
                  capacity: int | None = None) -> Tensor:
    """`x [T, h]` -> `[T, h]` with a Python loop over tokens and selected experts."""
    router = layer.router
    assert isinstance(router, TopKRouter)
    w1, w2, b1, b2 = expert_weights(layer)
    routes = [reference_route(x[t] @ router.weight.t(), config, router.expert_bias)
              for t in range(x.shape[0])]
    kept: set[tuple[int, int]] | None = None
    if capacity is not None:  # each expert keeps its `capacity` highest-weight tokens
        kept = set()
        for e in range(E):
            users = [(float(w), t) for t, (chosen, weights) in enumerate(routes)
                     for c, w in zip(chosen, weights, strict=True) if c == e]
            kept |= {(t, e) for _, t in sorted(users, reverse=True)[:capacity]}
    outputs = []
    for t, (chosen, weights) in enumerate(routes):
        out = torch.zeros(H)
        for e, w in zip(chosen, weights, strict=True):
            if kept is not None and (t, e) not in kept:
                continue
            hidden = w1[e] @ x[t] + (b1[e] if b1 is not None else 0.0)
            gate, up = hidden.chunk(2)
            expert_out = w2[e] @ (F.silu(gate) * up) + (b2[e] if b2 is not None else 0.0)
            out = out + w * expert_out
        shared = layer.shared_experts
        if shared is not None:
            assert isinstance(shared, SharedExpertMLP)
            sw1 = shared.linear_fc1.weight  # type: ignore[union-attr]
            sw2 = shared.linear_fc2.weight  # type: ignore[union-attr]
            gate, up = (sw1 @ x[t]).chunk(2)
            shared_out = sw2 @ (F.silu(gate) * up)
            if shared.gate_weight is not None:
                shared_out = shared_out * torch.sigmoid(shared.gate_weight[0] @ x[t])
            out = out + shared_out
        outputs.append(out)
    return torch.stack(outputs)


CASES: dict[str, dict[str, Any]] = {
    "softmax_topk_renormalised": {},
    "softmax_pre_softmax": {"moe_router_pre_softmax": True, "moe_router_topk": 3},
    "sigmoid_normalised_scaled": {"moe_router_score_function": "sigmoid",
                                  "moe_router_topk_scaling_factor": 2.5},
    "sigmoid_unnormalised": {"moe_router_score_function": "sigmoid", "moe_router_topk": 3,
                             "moe_router_norm_topk_prob": False},
    "sigmoid_group_limited_expert_bias_shared": {
        "moe_router_score_function": "sigmoid", "moe_router_topk": 4,
        "moe_router_num_groups": 4, "moe_router_group_topk": 2,
        "moe_router_enable_expert_bias": True, "moe_router_topk_scaling_factor": 2.5,
        "moe_shared_expert_intermediate_size": 20},
    "softmax_gated_shared_expert": {"moe_router_pre_softmax": True, "moe_router_topk": 4,
                                    "moe_shared_expert_intermediate_size": 20,
                                    "moe_shared_expert_gate": True},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_layer_equals_per_token_loop(case: str) -> None:
    torch.manual_seed(0)
    config = make_config(**CASES[case])
    layer = make_layer(config)
    if isinstance(layer.router, TopKRouter) and layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.randn(E) * 0.3)
    hidden = torch.randn(5, 3, H)  # [s, b, h]
    output, bias = layer(hidden)
    assert bias is None and output.shape == hidden.shape
    expected = reference_moe(hidden.reshape(-1, H), layer, config).view_as(hidden)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_expert_biases_are_scaled_with_the_routing_weight() -> None:
    torch.manual_seed(1)
    config = make_config(add_bias_linear=True)
    layer = make_layer(config)
    experts = layer.experts
    assert isinstance(experts, GroupedMLP)
    for linear in (experts.linear_fc1, experts.linear_fc2):
        assert isinstance(linear, GroupedLinear) and linear.bias is not None
        torch.nn.init.normal_(linear.bias)
    hidden = torch.randn(7, 2, H)
    expected = reference_moe(hidden.reshape(-1, H), layer, config).view_as(hidden)
    torch.testing.assert_close(layer(hidden)[0], expected, atol=1e-5, rtol=1e-5)


def test_capacity_factor_drops_lowest_prob_tokens_per_expert() -> None:
    torch.manual_seed(2)
    config = make_config(moe_expert_capacity_factor=0.5, moe_router_pre_softmax=True)
    layer = make_layer(config)
    hidden = torch.randn(16, 1, H)
    tokens = hidden.reshape(-1, H)
    capacity = math.ceil(16 * 2 / E * 0.5)
    _, indices = layer.router(tokens)
    routed = indices[indices < E]
    assert routed.numel() < 32 and torch.bincount(routed, minlength=E).max() <= capacity
    expected = reference_moe(tokens, layer, config, capacity=capacity).view_as(hidden)
    torch.testing.assert_close(layer(hidden)[0], expected, atol=1e-5, rtol=1e-5)


def _copy_grouped_into_sequential(grouped: MoELayer, sequential: MoELayer) -> None:
    sequential.router.load_state_dict(grouped.router.state_dict())
    w1, w2, _, _ = expert_weights(grouped)
    assert isinstance(sequential.experts, SequentialMLP)
    with torch.no_grad():
        for e, mlp in enumerate(sequential.experts.local_experts):
            mlp.linear_fc1.weight.copy_(w1[e])  # type: ignore[union-attr, operator]
            mlp.linear_fc2.weight.copy_(w2[e])  # type: ignore[union-attr, operator]


def test_grouped_mlp_equals_sequential_mlp_outputs_and_gradients() -> None:
    torch.manual_seed(3)
    config = make_config(moe_router_topk=3, moe_router_pre_softmax=True)
    grouped, sequential = make_layer(config), make_layer(config, sequential=True)
    _copy_grouped_into_sequential(grouped, sequential)
    hidden = torch.randn(6, 2, H)
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out1, out2 = grouped(x1)[0], sequential(x2)[0]
    torch.testing.assert_close(out1, out2, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out1)
    out1.backward(grad)
    out2.backward(grad)
    assert x1.grad is not None and x2.grad is not None
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    router1, router2 = grouped.router, sequential.router
    assert isinstance(router1, TopKRouter) and isinstance(router2, TopKRouter)
    torch.testing.assert_close(router1.weight.grad, router2.weight.grad, atol=1e-5, rtol=1e-5)
    g1 = expert_weights(grouped)[0]
    assert isinstance(grouped.experts, GroupedMLP) and isinstance(grouped.experts.linear_fc1, GroupedLinear)
    grad_w1 = grouped.experts.linear_fc1.weight.grad
    assert grad_w1 is not None and g1.shape == grad_w1.shape
    assert isinstance(sequential.experts, SequentialMLP)
    for e, mlp in enumerate(sequential.experts.local_experts):
        torch.testing.assert_close(grad_w1[e], mlp.linear_fc1.weight.grad, atol=1e-5, rtol=1e-5)  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["softmax_topk_renormalised", "sigmoid_group_limited_expert_bias_shared",
                                  "softmax_gated_shared_expert"])
def test_gradients_match_the_loop_reference(case: str) -> None:
    torch.manual_seed(4)
    config = make_config(**CASES[case])
    layer = make_layer(config)
    hidden = torch.randn(4, 2, H)
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    grad = torch.randn_like(hidden)
    layer(x1)[0].backward(grad)
    got = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    reference_moe(x2.reshape(-1, H), layer, config).view_as(hidden).backward(grad)
    assert x1.grad is not None and x2.grad is not None
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None, name
        torch.testing.assert_close(got[name], parameter.grad, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Auxiliary losses and the expert bias.


def test_aux_and_z_loss_reach_the_tracker_with_closed_form_values() -> None:
    torch.manual_seed(5)
    config = make_config(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_router_topk=2)
    layer = make_layer(config)
    tracker = MoEAuxLossTracker()
    assert bind_aux_loss_tracker(layer, tracker) == 1
    tokens = torch.randn(10, H)
    layer.train()
    layer(tokens.view(10, 1, H))
    router = layer.router
    assert isinstance(router, TopKRouter)
    logits = tokens @ router.weight.detach().t()  # [T, E]
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(2, dim=-1).indices
    counts = [int((chosen == e).sum()) for e in range(E)]
    # Switch loss: coeff * E / (k * T^2) * sum_e (sum_t p_te) * count_e
    aux = 0.01 * E / (2 * 10 * 10) * sum(float(probs[:, e].sum()) * counts[e] for e in range(E))
    z = 0.001 * sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / 10
    summary = tracker.summary()
    assert summary["load_balancing_loss"] == pytest.approx(aux, rel=1e-5)
    assert summary["z_loss"] == pytest.approx(z, rel=1e-5)
    total = tracker.total()
    assert total is not None and float(total) == pytest.approx(aux + z, rel=1e-5)
    total.backward()  # the aux losses carry gradient to the router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    tracker.clear()
    layer.eval()
    layer(tokens.view(10, 1, H))
    assert tracker.total() is None  # no aux losses outside training


def test_expert_bias_moves_toward_balance_once_per_update() -> None:
    torch.manual_seed(6)
    config = make_config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                         moe_router_bias_update_rate=0.01)
    layer = make_layer(config)
    router = layer.router
    assert isinstance(router, TopKRouter) and router.expert_bias is not None
    layer.train()
    tokens = torch.randn(12, 1, H)
    layer(tokens)
    layer(tokens)  # two micro-batches, one optimizer step
    _, indices = router(tokens.view(-1, H))
    counts = 3 * torch.bincount(indices.flatten(), minlength=E).float()  # 3 training forwards
    router.update_expert_bias([None])
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(router.expert_bias, expected)
    assert router.local_tokens_per_expert is not None
    assert float(router.local_tokens_per_expert.sum()) == 0.0  # counts reset per step
    assert "expert_bias" in router.state_dict() and "local_tokens_per_expert" not in router.state_dict()


# ---------------------------------------------------------------------------------------------
# The runtime check of the MoE slots (the static checks are in tests/typing/moe_slots.py).


class UserExperts(torch.nn.Module):
    """A user-written experts layer: every routed row through one shared linear."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, /, *,
                 pg: object = None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, dispatched_input: Tensor, tokens_per_expert: Tensor,
                permuted_probs: Tensor, /) -> tuple[Tensor, Tensor | None]:
        return self.linear(dispatched_input) * permuted_probs.unsqueeze(-1), None


def test_runtime_check_rejects_miswired_moe_slots() -> None:
    from protoformer.spec import SpecError

    with pytest.raises(SpecError, match=r"MoESubmodules\.experts.*TopKRouter"):
        MoESubmodules(router=TopKRouter, experts=TopKRouter)  # type: ignore[arg-type]
    grouped = functools.partial(GroupedMLP, submodules=GroupedMLPSubmodules(
        linear_fc1=GroupedLinear, linear_fc2=GroupedLinear, activation=ExpertActivation))
    with pytest.raises(SpecError, match=r"MoESubmodules\.shared_experts"):
        MoESubmodules(router=TopKRouter, experts=grouped, shared_experts=grouped)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"GroupedMLPSubmodules\.linear_fc2.*ColumnParallelLinear"):
        GroupedMLPSubmodules(linear_fc1=GroupedLinear, linear_fc2=ColumnParallelLinear,  # type: ignore[arg-type]
                             activation=ExpertActivation)


def test_user_experts_class_and_moe_layer_in_the_mlp_slot_build_and_run() -> None:
    from protoformer.backends import get_backend
    from protoformer.models import GPTModel
    from protoformer.recipes import gpt_layer_spec
    from protoformer.transformer.layer import TransformerLayerSubmodules

    config = make_config(normalization="RMSNorm")
    dense = gpt_layer_spec(get_backend("local"), config)
    moe = functools.partial(MoELayer, submodules=MoESubmodules(router=TopKRouter, experts=UserExperts))
    spec = TransformerLayerSubmodules(
        input_layernorm=dense.input_layernorm, self_attention=dense.self_attention,
        pre_mlp_layernorm=dense.pre_mlp_layernorm, mlp=moe)
    model = GPTModel(config, [dense, spec], vocab_size=32, max_sequence_length=8)
    ids = torch.randint(0, 32, (2, 8))
    assert model(ids).shape == (2, 8, 32)
    assert isinstance(model.decoder.layers[1].mlp, MoELayer)  # type: ignore[union-attr]
