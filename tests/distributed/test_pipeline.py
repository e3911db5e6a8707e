"""Pipeline parallelism (`torch.distributed.pipelining`, gloo) trains exactly like one process.

Every rank builds the single-process reference with the same seed and trains it on the whole
batch; the pipeline ranks run `pipeline_train_step` (the training loop's own step) over
their stages with micro-batches of one sequence (data-parallel replicas take their rows). The loss (on every rank), the clipped global gradient
norm, each parameter's gradient and, after the AdamW step, each weight must match the
reference's (atol/rtol 1e-5; AdamW's eps = 1e-4 keeps reduction-order rounding from being
amplified, see tp_testkit.optimizer_for). Which layers each rank holds is written out from
Megatron-Core's layout (stage `i` on rank `i % pp`), not read from the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from protoformer import TransformerConfig
from protoformer.parallel import ProcessGroups
from protoformer.parallel.data_parallel import DataParallel, ReplicatedDataParallel
from protoformer.parallel.fsdp import FullyShardedStages
from protoformer.parallel.pipeline import stage_parts
from protoformer.parallel.pipeline_schedule import PipelineParallel
from protoformer.train.loss import replica_mean_tensor, replica_rows
from protoformer.train.step import pipeline_train_step
from tests.distributed.tp_testkit import (
    GLOBAL_BATCH,
    MAX_NORM,
    build_gpt,
    close,
    device,
    expected_shard,
    full_tensor,
    gpt_config,
    optimizer_for,
    reference_step,
    run,
    single_process_twin,
    token_batch,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

STEPS = 2
# Layers of each pipeline rank for 4 layers over pp=2: one stage per rank, or two
# interleaved virtual stages per rank (stage i = layer i on rank i % 2).
EXPECTED_LAYERS = {("1F1B", 1): {0: {0, 1}, 1: {2, 3}},
                   ("Interleaved1F1B", 2): {0: {0, 2}, 1: {1, 3}}}


def train_pipelined(config: TransformerConfig, pg: ProcessGroups, schedule: str,
                    virtual: int, *, fsdp: bool = False, tied: bool = False) -> None:
    what = (f"PP=2 {schedule} x TP={pg.tp_size} x {'FSDP' if fsdp else 'DP'}={pg.dp_size}"
            f"{', tied embeddings' if tied else ''}")
    torch.manual_seed(0)
    reference = build_gpt(single_process_twin(config), None, tied=tied)
    # Each rank builds only its stages (the rest on the meta device), from the same seed.
    torch.manual_seed(0)
    model = build_gpt(config, pg, tied=tied,
                      parts=stage_parts(config.num_layers, pg.pp_rank, pg.pp_size, virtual))
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if not param.is_meta:  # the one-process model's initial weights, drawn the same way
            close(param.detach(), expected_shard(name, expected[name].detach(), param, config,
                                                 pg.tp_rank, pg.tp_size), f"{what}: init {name}")
    pipeline = PipelineParallel(model, pg, device(), microbatches=GLOBAL_BATCH // pg.dp_size,
                                schedule=schedule, virtual=virtual)
    module = pipeline.module
    names = [name for name, _ in module.named_parameters()]
    assert not any(param.is_meta for param in module.parameters()), f"{what}: meta in stages"
    layers = {int(name.split(".")[2]) for name in names if name.startswith("decoder.layers.")}
    assert layers == EXPECTED_LAYERS[schedule, virtual][pg.pp_rank], f"{what}: layers {layers}"
    first, last = pg.pp_rank == 0, pg.pp_rank == 1
    # With tied embeddings the last stage holds a copy of the embedding (the output weight).
    assert ("embedding.weight" in names) == (first or (tied and last)), \
        f"{what}: embedding on rank {pg.pp_rank}"
    assert ("output_layer.weight" in names) == (last and not tied), \
        f"{what}: output layer on {pg.pp_rank}"
    assert (any(n.startswith("decoder.final_layernorm.") for n in names)) == last
    assert set(names) <= set(expected), f"{what}: names not the full model's: {names}"
    replicated: DataParallel = (FullyShardedStages(pipeline.split, pg, device()) if fsdp
                                else ReplicatedDataParallel(module, pg, device(), wrap=False))
    ref_optimizer, optimizer = optimizer_for(reference), optimizer_for(module)
    parameters = list(module.parameters())
    for step in range(STEPS):
        rows = token_batch(step)
        ref_loss, ref_norm = reference_step(reference, ref_optimizer, rows)
        output = pipeline_train_step(pipeline, replicated, optimizer, replica_rows(rows, pg),
                                     parameters=parameters, grad_clip=MAX_NORM, pg=pg,
                                     device=device())
        close(output.loss, ref_loss, f"{what}: loss at step {step}")
        close(output.grad_norm, ref_norm, f"{what}: grad norm at step {step}")
        assert float(ref_norm) > MAX_NORM, f"{what}: clipping never acted"
        for name, param in module.named_parameters():
            full = expected[name]
            assert param.grad is not None and full.grad is not None, f"{what}: {name} no grad"
            close(full_tensor(param.grad), expected_shard(name, full.grad, param, config, pg.tp_rank,
                                                    pg.tp_size),
                  f"{what}, step {step}: grad of {name}")
            close(full_tensor(param.detach()), expected_shard(name, full.detach(), param, config, pg.tp_rank,
                                                 pg.tp_size), f"{what}, step {step}: {name}")
    # Evaluation through the schedule: forward only, the reference's loss, no gradients.
    rows = token_batch(STEPS)
    with torch.no_grad():
        ref_loss = reference(rows[:, :-1], rows[:, 1:]).mean()
    close(replica_mean_tensor(pipeline.evaluate(replica_rows(rows, pg), device()), pg), ref_loss,
          f"{what}: evaluation loss")


def check_pipeline(rank: int, world_size: int, schedule: str, virtual: int,
                   tied: bool) -> None:
    pg = ProcessGroups.from_torchrun(tp=1, pp=2)
    assert (pg.pp_size, pg.pp_rank, pg.dp_size) == (2, rank, 1)
    train_pipelined(gpt_config(num_layers=4), pg, schedule, virtual, tied=tied)


def check_pipeline_times_tp(rank: int, world_size: int, schedule: str, virtual: int,
                            tied: bool) -> None:
    pg = ProcessGroups.from_torchrun(tp=2, pp=2)
    # Megatron's order tp-dp-pp: ranks 0, 1 are stage 0's tensor-parallel pair, 2, 3 stage 1's.
    assert (pg.tp_rank, pg.pp_rank) == (rank % 2, rank // 2)
    config = gpt_config(num_layers=4, sequence_parallel=True, gated_linear_unit=True,
                        activation_func=torch.nn.functional.silu)
    train_pipelined(config, pg, schedule, virtual, tied=tied)


def check_pipeline_times_dp(rank: int, world_size: int, schedule: str, virtual: int) -> None:
    pg = ProcessGroups.from_torchrun(tp=1, pp=2)
    # Megatron's order tp-dp-pp: ranks 0, 1 are stage 0 of replicas 0, 1; ranks 2, 3 stage 1.
    assert (pg.dp_rank, pg.pp_rank, pg.dp_size) == (rank % 2, rank // 2, 2)
    train_pipelined(gpt_config(num_layers=4), pg, schedule, virtual)


def check_pipeline_times_fsdp(rank: int, world_size: int, schedule: str, virtual: int) -> None:
    pg = ProcessGroups.from_torchrun(tp=1, pp=2)
    # Tied: the last stage's embedding copy sits in its FSDP root unit; each data-parallel
    # shard's gradient is summed with the first stage's same shard.
    train_pipelined(gpt_config(num_layers=4), pg, schedule, virtual, fsdp=True, tied=True)


# Tied embeddings: the last stage's copy gets the sum of both uses' gradients (the
# reference's embedding gradient), the norm counts it once, both copies step alike.
# (Untied Interleaved1F1B is covered by the slow PP x TP and PP x FSDP tests.)
@pytest.mark.parametrize(("schedule", "virtual", "tied"),
                         [("1F1B", 1, False), ("1F1B", 1, True), ("Interleaved1F1B", 2, True)])
def test_pipeline_trains_like_one_process(schedule: str, virtual: int, tied: bool) -> None:
    run(check_pipeline, 2, schedule, virtual, tied)


@pytest.mark.slow  # four processes
@pytest.mark.parametrize(("schedule", "virtual", "tied"),
                         [("1F1B", 1, False), ("Interleaved1F1B", 2, True)])
def test_pipeline_times_tensor_parallel_trains_like_one_process(schedule: str, virtual: int,
                                                                tied: bool) -> None:
    run(check_pipeline_times_tp, 4, schedule, virtual, tied, timeout_s=240)


@pytest.mark.slow  # four processes
def test_pipeline_times_data_parallel_trains_like_one_process() -> None:
    run(check_pipeline_times_dp, 4, "1F1B", 1, timeout_s=240)


@pytest.mark.slow  # four processes
def test_pipeline_times_fsdp_trains_like_one_process() -> None:
    run(check_pipeline_times_fsdp, 4, "Interleaved1F1B", 2, timeout_s=240)
