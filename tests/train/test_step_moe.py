"""A training step of a mixture-of-experts model: the auxiliary losses join the loss and are
reported apart; the aux-loss-free expert bias moves once per optimizer step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.parallel.data_parallel import ReplicatedDataParallel
from protoformer.parallel.groups import ProcessGroups
from protoformer.recipes.moe import gpt_moe_layer_specs
from protoformer.train.step import train_step
from protoformer.transformer.moe import TopKRouter


def moe_gpt(seed: int, **overrides: object) -> GPTModel:
    config = TransformerConfig(**{
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
        "normalization": "RMSNorm", "add_bias_linear": False, "gated_linear_unit": True,
        "activation_func": F.silu, "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32,
        "moe_aux_loss_coeff": 0.1, "moe_z_loss_coeff": 0.01, **overrides})
    torch.manual_seed(seed)
    return GPTModel(config, gpt_moe_layer_specs(get_backend("local"), config), 256, 64)


def test_step_adds_aux_losses_to_the_loss_and_reports_them_apart() -> None:
    rows = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    model, reference = moe_gpt(1), moe_gpt(1)
    # Reference gradients: the mean next-token loss plus every router's aux and z losses.
    lm = F.cross_entropy(reference(rows[:, :-1]).reshape(-1, 256), rows[:, 1:].reshape(-1))
    aux = reference.moe_aux_losses.total()
    assert aux is not None and len(reference.moe_aux_losses.summary()) == 2  # balancing, z
    (lm + aux).backward()  # pyright: ignore[reportUnknownMemberType]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    output = train_step(ReplicatedDataParallel(model, ProcessGroups(), torch.device("cpu")),
                        optimizer, rows, micro_batches=1, parameters=list(model.parameters()),
                        grad_clip=1e9, pg=ProcessGroups(), device=torch.device("cpu"),
                        aux_losses=model.moe_aux_losses)
    assert float(output.loss) == pytest.approx(float(lm.detach()), abs=1e-5)  # the LM loss alone
    assert output.aux_loss is not None and float(output.aux_loss) == pytest.approx(float(aux.detach()), rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_expert_bias_moves_once_per_optimizer_step_over_micro_batches() -> None:
    model = moe_gpt(2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                    moe_router_bias_update_rate=0.05, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 2
    rows = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    output = train_step(ReplicatedDataParallel(model, ProcessGroups(), torch.device("cpu")),
                        optimizer, rows, micro_batches=2, parameters=list(model.parameters()),
                        grad_clip=1e9, pg=ProcessGroups(), device=torch.device("cpu"),
                        aux_losses=model.moe_aux_losses,
                        after_optimizer_step=model.update_expert_bias)
    assert output.aux_loss is None  # no aux-loss coefficients: nothing recorded
    for router in routers:
        assert router.expert_bias is not None
        # One update: every entry moved by exactly +-rate (or 0 at the mean load), not twice.
        magnitudes = router.expert_bias.abs()
        assert bool(((magnitudes == 0) | ((magnitudes - 0.05).abs() < 1e-7)).all())
        assert float(magnitudes.max()) > 0
