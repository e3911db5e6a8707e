"""Expert parallelism (gloo, 2 and 4 processes): a GPT model with MoE layers split over
expert-parallel ranks (with tensor or data parallelism too) gives the single-process model's
outputs, loss and every gradient.

Each rank builds the single-process reference from the same seed and gives the split model
the reference's weights: tensor-parallel slices as in `tp_testkit.expected_shard`, and for the
routed experts the rows `ep_rank * E_local ...` of the `[E, ...]` expert weights. Each
data-parallel rank runs its own slice of the batch; the reference runs the whole batch.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.parallel import ProcessGroups
from protoformer.parallel.grads import finalize_model_grads, grad_norm, is_expert_parallel
from protoformer.recipes.moe import gpt_moe_layer_specs
from protoformer.transformer.moe import MoELayer
from protoformer.transformer.moe.alltoall_dispatcher import MoEAlltoAllTokenDispatcher
from tests.distributed.tp_testkit import (
    BATCH,
    SEQ,
    VOCAB,
    close,
    device,
    expected_shard,
    gpt_config,
    run,
)

NUM_EXPERTS = 4


def moe_config(**overrides: object) -> TransformerConfig:
    # Layer 0 dense, layer 1 MoE (4 experts, top-2, a shared expert); gated MLPs.
    return gpt_config(num_moe_experts=NUM_EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=8,
                      moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=8,
                      gated_linear_unit=True, **overrides)


def build(config: TransformerConfig, pg: ProcessGroups | None) -> GPTModel:
    with torch.device(device()):
        return GPTModel(config, gpt_moe_layer_specs(get_backend("local"), config), VOCAB, 32,
                        pg=pg)


def reference_part(name: str, full: Tensor, local: Tensor, config: TransformerConfig,
                   pg: ProcessGroups) -> Tensor:
    """This rank's part of a single-process tensor: its TP slice, and its experts' rows."""
    part = expected_shard(name, full, local, config, pg.tp_rank, pg.tp_size)
    if is_expert_parallel(local):
        experts = NUM_EXPERTS // pg.ep_size
        part = part[pg.ep_rank * experts:(pg.ep_rank + 1) * experts]
    return part


def check_expert_parallel(rank: int, world_size: int, tp: int, ep: int) -> None:
    pg = ProcessGroups.from_torchrun(tp=tp, ep=ep)
    dp = world_size // tp
    assert (pg.tp_size, pg.dp_size, pg.ep_size, pg.expt_dp_size) == (tp, dp, ep, dp // ep)
    config = moe_config()
    torch.manual_seed(0)
    reference = build(config, None)
    split_config = replace(config, expert_model_parallel_size=ep)
    model = build(split_config, pg)
    moe = model.decoder.layers[1].mlp  # type: ignore[union-attr]
    assert isinstance(moe, MoELayer)
    assert isinstance(moe.token_dispatcher, MoEAlltoAllTokenDispatcher)
    assert moe.num_local_experts == NUM_EXPERTS // ep
    assert moe.local_expert_offset == pg.ep_rank * NUM_EXPERTS // ep
    full = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(reference_part(name, full[name], param, config, pg))

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (dp * BATCH, SEQ), generator=generator).to(device())
    labels = torch.randint(0, VOCAB, (dp * BATCH, SEQ), generator=generator).to(device())
    mine = slice(pg.dp_rank * BATCH, (pg.dp_rank + 1) * BATCH)

    with torch.no_grad():
        expected_logits = reference(tokens)[mine]
        close(model(tokens[mine]), expected_logits, f"rank {rank}: logits")
    reference_loss = reference(tokens, labels).mean()
    reference_loss.backward()  # type: ignore[no-untyped-call]
    loss = model(tokens[mine], labels[mine]).mean()
    loss.backward()  # type: ignore[no-untyped-call]
    finalize_model_grads(model, pg, reduce_data_parallel=True)
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=pg.dp)
    close(global_loss / dp, reference_loss.detach(), f"rank {rank}: loss")
    for name, param in model.named_parameters():
        reference_grad = full[name].grad
        assert reference_grad is not None, name
        close(param.grad, reference_part(name, reference_grad, param, config, pg),
              f"rank {rank}: grad of {name}")
    reference_norm = torch.cat([p.grad.reshape(-1) for p in reference.parameters()
                                if p.grad is not None]).norm()
    close(grad_norm(model.parameters(), pg), reference_norm, f"rank {rank}: gradient norm")


@pytest.mark.parametrize(("world_size", "tp", "ep"), [(2, 1, 2), (4, 2, 2), (4, 1, 2)],
                         ids=["ep2", "ep2-tp2", "ep2-dp2"])
def test_expert_parallel_equals_one_process(world_size: int, tp: int, ep: int) -> None:
    run(check_expert_parallel, world_size, tp, ep, timeout_s=180)


def check_wrong_group_size(rank: int, world_size: int) -> None:
    del rank, world_size
    pg = ProcessGroups.from_torchrun(ep=2)
    with pytest.raises(ValueError, match=r"expert_model_parallel_size=1 but the expert-parallel "
                                         r"group has 2 rank\(s\)"):
        build(moe_config(), pg)
    with pytest.raises(ValueError, match=r"ep=3 must be >= 1 and divide the data-parallel size 2"):
        ProcessGroups.from_torchrun(ep=3)


def test_a_config_that_disagrees_with_the_groups_is_refused() -> None:
    run(check_wrong_group_size, 2, timeout_s=120)


def check_checkpoint_round_trip(rank: int, world_size: int, run_dir: str) -> None:
    del world_size
    from protoformer.train.checkpoint import load_checkpoint
    from protoformer.train.checkpoint_dist import (
        load_distributed_checkpoint,
        save_distributed_checkpoint,
    )

    pg = ProcessGroups.from_torchrun(ep=2)
    config = replace(moe_config(), expert_model_parallel_size=2)
    torch.manual_seed(0)
    model = build(config, pg)
    experts = {name: param.detach().clone() for name, param in model.named_parameters()
               if is_expert_parallel(param)}
    assert experts
    gathered: list[object] = [None, None]
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in experts.items()})
    assert gathered[0] != gathered[1], "both EP ranks initialised the same experts"

    step_dir = save_distributed_checkpoint(run_dir, 3, model, None, {"note": "ep"}, pg=pg,
                                           rng_state=None)
    names = sorted(p.name for p in step_dir.iterdir() if p.name.startswith("model"))
    assert names == ["model.ep00-of-02.safetensors", "model.ep01-of-02.safetensors"], names

    torch.manual_seed(7)  # another initialisation, then the checkpoint's weights
    resumed = build(config, pg)
    load_distributed_checkpoint(step_dir, resumed, pg=pg)
    for (name, param), (_, again) in zip(model.named_parameters(), resumed.named_parameters(),
                                         strict=True):
        close(again.detach(), param.detach(), f"rank {rank}: resumed {name}")

    single = build(moe_config(), None)  # the experts of both ranks merged on one process
    load_checkpoint(step_dir, single)
    full = dict(single.named_parameters())
    for name, param in model.named_parameters():
        close(param.detach(), reference_part(name, full[name].detach(), param, config, pg),
              f"rank {rank}: merged {name}")


def test_an_expert_parallel_checkpoint_resumes_and_merges_on_one_process(tmp_path: object) -> None:
    run(check_checkpoint_round_trip, 2, str(tmp_path), timeout_s=180)
