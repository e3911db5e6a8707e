"""A sharded (torch_dist) checkpoint saved under expert parallelism resumes without it.

Two ranks train an MoE model (dense layer 0, then 4 routed experts + a shared expert) with
EP=2 (each rank holds 2 experts; the two ranks are also the data-parallel replicas) for 3
steps, saving after step 2 and keeping their own tensors and step-3 results on the side. The
checkpoint is loaded on one process: the experts of EP rank r must be experts 2r and 2r + 1
of the single-process model (Megatron-Core's contiguous blocks, written out here, for grouped
experts `[E, ...]` and for one MLP per expert `local_experts.{i}`), every other tensor rank
0's; its step 3 (loss, clipped gradient norm, updated weights: the AdamW moments carried
over) equals the EP=2 run's. Two ranks with EP=1 (data-parallel 2) do the same.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.parallel import ProcessGroups
from protoformer.parallel.data_parallel import ReplicatedDataParallel
from protoformer.recipes import gpt_layer_spec
from protoformer.recipes.moe import moe_spec
from protoformer.train.checkpoint import latest_checkpoint
from protoformer.train.checkpoint_dcp import (
    layout_change_note,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from protoformer.train.checkpoint_files import JSONValue
from protoformer.train.options import TrainOptions, check_resumable
from protoformer.train.step import StepOutput, train_step
from protoformer.transformer.moe import MoELayer
from tests.distributed.tp_testkit import SEQ, VOCAB, close, device, gpt_config, run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

EXPERTS = 4
GLOBAL_BATCH = 4
MAX_NORM = 0.5


def moe_config() -> TransformerConfig:
    return gpt_config(num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=8,
                      moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=8,
                      gated_linear_unit=True)


def build(config: TransformerConfig, pg: ProcessGroups | None, grouped: bool) -> GPTModel:
    backend = get_backend("local")
    dense = gpt_layer_spec(backend, config)
    moe = dataclasses.replace(dense, mlp=functools.partial(
        MoELayer, submodules=moe_spec(backend, config, grouped=grouped)))
    with torch.device(device()):
        return GPTModel(config, [dense, moe], VOCAB, 32, pg=pg)


def optimizer_for(model: GPTModel) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-4, weight_decay=0.1)


def batch(step: int) -> Tensor:
    generator = torch.Generator().manual_seed(300 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator).to(device())


def step(model: GPTModel, optimizer: torch.optim.Optimizer, pg: ProcessGroups,
         index: int) -> StepOutput:
    share = GLOBAL_BATCH // pg.dp_size
    rows = batch(index)[pg.dp_rank * share:(pg.dp_rank + 1) * share]
    return train_step(ReplicatedDataParallel(model, pg, device(), wrap=False), optimizer, rows,
                      micro_batches=1, parameters=list(model.parameters()), grad_clip=MAX_NORM,
                      pg=pg, device=device())


def save_at_ep2(rank: int, world_size: int, run_dir: str, grouped: bool) -> None:
    pg = ProcessGroups.from_torchrun(ep=2)
    assert (pg.ep_size, pg.ep_rank, pg.dp_size) == (2, rank, 2)
    torch.manual_seed(0)
    model = build(replace(moe_config(), expert_model_parallel_size=2), pg, grouped)
    optimizer = optimizer_for(model)
    for index in range(2):
        step(model, optimizer, pg, index)
    save_sharded_checkpoint(run_dir, 2, model, optimizer, {}, pg=pg, rng_state=None)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    output = step(model, optimizer, pg, 2)
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"saved": saved, "after": after, "loss": output.loss.clone(),
                "norm": output.grad_norm.clone()}, Path(run_dir) / f"rank{rank}.pt")


def expected_full(run_dir: Path, key: str, grouped: bool) -> dict[str, Tensor]:
    """The single-process tensors from the EP ranks' own, by Megatron's placement."""
    ranks = [torch.load(run_dir / f"rank{r}.pt", weights_only=True)[key] for r in range(2)]
    local = EXPERTS // 2
    full: dict[str, Tensor] = {}
    for name, value in ranks[0].items():
        if ".experts." not in name or "shared_experts" in name:
            full[name] = value  # replicated: equal on both ranks
        elif grouped:  # [E_local, ...] blocks stacked in EP rank order
            full[name] = torch.cat([ranks[0][name], ranks[1][name]])
        else:  # local_experts.{i} of rank r is expert r * E_local + i
            head, tail = name.split(".local_experts.")
            i, rest = tail.split(".", 1)
            for r in range(2):
                full[f"{head}.local_experts.{r * local + int(i)}.{rest}"] = ranks[r][name]
    return full


def check_resumed(model: GPTModel, optimizer: torch.optim.Optimizer, pg: ProcessGroups,
                  run_dir: Path, grouped: bool, what: str) -> None:
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    load_sharded_checkpoint(checkpoint, model, optimizer, pg=pg)
    saved = expected_full(run_dir, "saved", grouped)
    assert sorted(saved) == sorted(name for name, _ in model.named_parameters())
    for name, param in model.named_parameters():
        close(param.detach(), saved[name], f"{what}: loaded {name}")
    output = step(model, optimizer, pg, 2)
    uninterrupted = torch.load(run_dir / "rank0.pt", weights_only=True)
    close(output.loss, uninterrupted["loss"], f"{what}: next-step loss")
    close(output.grad_norm, uninterrupted["norm"], f"{what}: next-step grad norm")
    after = expected_full(run_dir, "after", grouped)
    for name, param in model.named_parameters():
        close(param.detach(), after[name], f"{what}: {name} after the next step")


def resume_at_ep1(rank: int, world_size: int, run_dir: str, grouped: bool) -> None:
    pg = ProcessGroups.from_torchrun(ep=1)
    torch.manual_seed(3)  # other initial weights: the checkpoint must overwrite them all
    model = build(moe_config(), pg, grouped)
    check_resumed(model, optimizer_for(model), pg, Path(run_dir), grouped,
                  f"EP=1 x DP=2 rank {rank}")


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-experts", "mlp-per-expert"])
def test_ep2_checkpoint_resumes_on_one_process_and_at_ep1(tmp_path: Path, grouped: bool) -> None:
    run(save_at_ep2, 2, str(tmp_path), grouped)
    torch.manual_seed(1)
    model = build(moe_config(), None, grouped)
    check_resumed(model, optimizer_for(model), ProcessGroups(), tmp_path, grouped, "one process")
    if grouped:
        run(resume_at_ep1, 2, str(tmp_path), grouped)


def test_a_sharded_checkpoint_resumes_with_another_ep_and_says_so(tmp_path: Path) -> None:
    saved = TrainOptions(preset="tiny-moe", ep=2).to_json()
    now = TrainOptions(preset="tiny-moe", ep=1)
    check_resumable(saved, now, tmp_path, any_layout=True)  # torch_dist: the experts re-slice
    with pytest.raises(ValueError, match=r"ep: checkpoint 2, now 1"):
        check_resumable(saved, now, tmp_path)  # per-rank safetensors: the same --ep only
    layout: dict[str, JSONValue] = {"tensor_parallel": 1, "data_parallel": 2,
                                    "pipeline_parallel": 1, "expert_parallel": 2,
                                    "world_size": 2}
    note = layout_change_note({"layout": layout}, ProcessGroups(), 1)
    assert note is not None and "saved at tp=1 x dp=2 (ep=2) x pp=1" in note, note
    assert "now tp=1 x dp=1 (ep=1) x pp=1" in note, note
