"""Activation recomputation and bf16 mixed precision, as config options of the model.

- `recompute_granularity="full"` (whole layer) and `"selective"` (core attention only) give the
  same loss and gradients as storing every activation, dropout included (the RNG state is
  replayed), and really recompute (the recomputed module runs twice per training step).
- `bf16=True` with float32 parameters runs the model under bfloat16 autocast: float32 master
  weights and gradients, a bf16 forward close to the float32 one, a float32 loss. With
  `params_dtype=bfloat16` the weights themselves are bf16 (pure bf16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.recipes import gpt_layer_spec
from protoformer.transformer.attention import SelfAttention

VOCAB = 61


def make_config(**overrides: object) -> TransformerConfig:
    fields: dict[str, object] = {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 64, "normalization": "RMSNorm", "gated_linear_unit": True,
        "activation_func": F.silu, "add_bias_linear": False, "attention_dropout": 0.0,
        "hidden_dropout": 0.0, "init_method_std": 0.05,
    }
    fields.update(overrides)
    return TransformerConfig(**fields)  # type: ignore[arg-type]


def make_model(config: TransformerConfig, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(config, gpt_layer_spec(get_backend("local"), config), VOCAB, 32)


def loss_and_grads(model: GPTModel, ids: Tensor, labels: Tensor, seed: int = 1
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every run
    loss = model(ids, labels)
    weights = torch.linspace(0.1, 1.0, loss.numel()).view_as(loss)  # non-uniform upstream grads
    (loss * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("granularity", ["full", "selective"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_gives_identical_gradients(granularity: str, dropout: float) -> None:
    ids = torch.randint(0, VOCAB, (3, 12))
    labels = torch.randint(0, VOCAB, (3, 12))
    base = make_config(attention_dropout=dropout, hidden_dropout=dropout)
    stored = make_model(base)
    recomputed = make_model(make_config(attention_dropout=dropout, hidden_dropout=dropout,
                                        recompute_granularity=granularity))
    recomputed.load_state_dict(stored.state_dict())
    loss, grads = loss_and_grads(stored, ids, labels)
    loss_r, grads_r = loss_and_grads(recomputed, ids, labels)
    torch.testing.assert_close(loss_r, loss, atol=0.0, rtol=0.0)
    assert grads.keys() == grads_r.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize(("granularity", "layer_runs", "core_runs"),
                         [(None, 1, 1), ("selective", 1, 2), ("full", 2, 2)])
def test_recompute_reruns_what_it_promises(granularity: str | None, layer_runs: int,
                                           core_runs: int) -> None:
    model = make_model(make_config(num_layers=1, recompute_granularity=granularity))
    layer = model.decoder.layers[0]
    attention = layer.self_attention
    assert isinstance(attention, SelfAttention)
    calls = {"layer_mlp": 0, "core": 0}

    def count(name: str):  # type: ignore[no-untyped-def]
        def hook(*_: object) -> None:
            calls[name] += 1
        return hook

    # Pre-hooks: a recomputation stops early, inside the last module, once every saved
    # tensor is back, so that module's post-forward hook would not fire.
    layer.mlp.register_forward_pre_hook(count("layer_mlp"))
    attention.core_attention.register_forward_pre_hook(count("core"))
    loss_and_grads(model, torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8)))
    assert calls == {"layer_mlp": layer_runs, "core": core_runs}


def test_recompute_is_off_in_eval_and_without_grad() -> None:
    model = make_model(make_config(recompute_granularity="selective"))
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention, SelfAttention)
    runs: list[int] = []
    attention.core_attention.register_forward_pre_hook(lambda *_: runs.append(1))
    model.eval()
    model(torch.randint(0, VOCAB, (1, 5)))
    with torch.no_grad():
        model.train()
        model(torch.randint(0, VOCAB, (1, 5)))
    assert len(runs) == 2


def relative_error(got: Tensor, want: Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def test_bf16_mixed_precision_forward_is_close_to_fp32() -> None:
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = torch.randint(0, VOCAB, (2, 16))
    fp32 = make_model(make_config()).eval()
    mixed = make_model(make_config(bf16=True)).eval()
    mixed.load_state_dict(fp32.state_dict())
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # master weights
    logits, logits_mixed = fp32(ids), mixed(ids)
    assert logits_mixed.dtype == torch.bfloat16  # the output layer ran in bf16
    assert relative_error(logits_mixed, logits) < 3e-2
    loss_mixed = mixed(ids, labels)
    assert loss_mixed.dtype == torch.float32  # the loss is computed in float32
    assert relative_error(loss_mixed, fp32(ids, labels)) < 1e-2
    # Training: gradients land in the float32 parameters and are close to the fp32 ones.
    _, grads = loss_and_grads(fp32, ids, labels)
    _, grads_mixed = loss_and_grads(mixed, ids, labels)
    for name, grad in grads.items():
        assert grads_mixed[name].dtype == torch.float32
        assert relative_error(grads_mixed[name], grad) < 6e-2, name


def test_pure_bf16_parameters_forward_is_close_to_fp32() -> None:
    ids = torch.randint(0, VOCAB, (2, 16))
    fp32 = make_model(make_config()).eval()
    pure = make_model(make_config(bf16=True, params_dtype=torch.bfloat16)).eval()
    pure.load_state_dict(fp32.state_dict())  # copies cast to bf16
    assert all(p.dtype == torch.bfloat16 for p in pure.parameters())
    logits = pure(ids)
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits, fp32(ids)) < 3e-2
    assert pure(ids, torch.randint(0, VOCAB, (2, 16))).dtype == torch.float32


def test_bf16_norms_run_in_float32() -> None:
    # A bf16 input whose square overflows bf16's precision is normalized as float32 would.
    model = make_model(make_config(bf16=True))
    norm = model.decoder.layers[0].input_layernorm
    x = (torch.randn(4, 1, 32) * 300).bfloat16()
    expected = (x.double() / x.double().pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
    assert relative_error(norm(x), expected) < 1e-2
