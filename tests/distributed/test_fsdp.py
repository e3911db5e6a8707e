"""FSDP2 over the data-parallel group (alone and under TP=2) trains exactly like one process,
and its sharded (DCP) checkpoint resumes on one process with the same next step.

Each rank also trains the single-process reference on the whole global batch. The sharded
model runs the training loop's own `train_step` with `FullyShardedDataParallel`: losses,
gradient norms (clipped every step), gradients (gathered from the shards) and weights must
match the reference (atol/rtol 1e-5; the AdamW eps is large enough that reduction-order
rounding cannot be amplified past that, see tp_testkit.optimizer_for).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from protoformer import TransformerConfig
from protoformer.parallel import ProcessGroups
from protoformer.parallel.fsdp import FullyShardedDataParallel
from protoformer.parallel.parameters import parallel_metadata
from protoformer.train.checkpoint_dcp import load_sharded_checkpoint, save_sharded_checkpoint
from protoformer.train.step import train_step
from tests.distributed.tp_testkit import (
    GLOBAL_BATCH,
    MAX_NORM,
    build_gpt,
    close,
    device,
    expected_shard,
    full_tensor,
    gpt_config,
    load_reference_weights,
    optimizer_for,
    reference_step,
    run,
    single_process_twin,
    token_batch,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

STEPS = 2


def compare(model: nn.Module, reference: nn.Module, config: TransformerConfig,
            pg: ProcessGroups, what: str) -> None:
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), f"{name}: not sharded by fully_shard"
        local = full_tensor(param.detach())  # this tensor-parallel rank's slice, gathered over dp
        full = expected[name]
        # (`param` carries the split record expected_shard reads.)
        close(local, expected_shard(name, full.detach(), param, config, pg.tp_rank, pg.tp_size),
              f"{what}: {name}")
        assert param.grad is not None and full.grad is not None
        close(full_tensor(param.grad), expected_shard(name, full.grad, param, config, pg.tp_rank,
                                                pg.tp_size), f"{what}: grad of {name}")


def train_sharded(rank: int, config: TransformerConfig, pg: ProcessGroups, what: str,
                  save_to: Path | None) -> None:
    torch.manual_seed(0)
    reference = build_gpt(single_process_twin(config), None)
    model = build_gpt(config, pg)
    load_reference_weights(model, reference, config, pg.tp_rank, pg.tp_size)
    split_before = {name: parallel_metadata(p) for name, p in model.named_parameters()}
    sharded = FullyShardedDataParallel(model, pg, device())
    # The records survive fully_shard's swap of the parameters for DTensors.
    assert {n: parallel_metadata(p) for n, p in model.named_parameters()} == split_before
    assert any(r.tensor_model_parallel for r in split_before.values())
    ref_optimizer, optimizer = optimizer_for(reference), optimizer_for(model)
    share = GLOBAL_BATCH // pg.dp_size
    parameters = list(model.parameters())
    for step in range(STEPS):
        rows = token_batch(step)
        ref_loss, ref_norm = reference_step(reference, ref_optimizer, rows)
        mine = rows[pg.dp_rank * share:(pg.dp_rank + 1) * share]
        output = train_step(sharded, optimizer, mine, micro_batches=share, parameters=parameters,
                            grad_clip=MAX_NORM, pg=pg, device=device())
        close(output.loss, ref_loss, f"{what}: loss at step {step}")
        close(output.grad_norm, ref_norm, f"{what}: grad norm at step {step}")
        assert float(ref_norm) > MAX_NORM, f"{what}: clipping never acted"
        compare(model, reference, config, pg, f"{what}, step {step}")
    if save_to is not None:
        save_sharded_checkpoint(save_to, STEPS, model, optimizer, {"note": what}, pg=pg,
                                rng_state=None)
        if rank == 0:  # the reference's state, for the single-process resume in the test
            torch.save({"model": reference.state_dict(), "optimizer": ref_optimizer.state_dict()},
                       save_to / "reference.pt")


def check_fsdp(rank: int, world_size: int, save_to: str) -> None:
    pg = ProcessGroups.from_torchrun(tp=1)
    assert pg.dp_size == world_size
    train_sharded(rank, gpt_config(), pg, "FSDP=2", Path(save_to))


def check_tp_times_fsdp(rank: int, world_size: int) -> None:
    pg = ProcessGroups.from_torchrun(tp=2)
    config = gpt_config(sequence_parallel=True, gated_linear_unit=True,
                        activation_func=torch.nn.functional.silu)
    train_sharded(rank, config, pg, "TP=2 x FSDP=2, sequence parallel", None)


def test_fsdp_trains_like_one_process_and_resumes_on_one_process(tmp_path: Path) -> None:
    run(check_fsdp, 2, str(tmp_path))
    checkpoint = tmp_path / "checkpoints" / f"step_{STEPS:06d}"
    assert (checkpoint / "dcp" / ".metadata").is_file()
    # One process, no process group, no FSDP: the sharded checkpoint loads whole.
    torch.manual_seed(1)  # other initial weights: the checkpoint must overwrite them all
    model, reference = build_gpt(gpt_config(), None), build_gpt(gpt_config(), None)
    optimizer, ref_optimizer = optimizer_for(model), optimizer_for(reference)
    load_sharded_checkpoint(checkpoint, model, optimizer, pg=ProcessGroups())
    saved = torch.load(tmp_path / "reference.pt", weights_only=True)
    reference.load_state_dict(saved["model"])
    ref_optimizer.load_state_dict(saved["optimizer"])
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        close(a.detach(), b.detach(), f"resumed {name}")
    rows = token_batch(STEPS)  # the next step: same loss, same update (optimizer state restored)
    loss, norm = reference_step(model, optimizer, rows)
    ref_loss, ref_norm = reference_step(reference, ref_optimizer, rows)
    close(loss, ref_loss, "next-step loss after resuming on one process")
    close(norm, ref_norm, "next-step grad norm after resuming on one process")
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        close(a.detach(), b.detach(), f"{name} after the next step")


@pytest.mark.slow  # four processes
def test_tensor_parallel_times_fsdp_trains_like_one_process() -> None:
    run(check_tp_times_fsdp, 4, timeout_s=240)


def save_then_die_midway(rank: int, world_size: int, run_dir: str) -> None:
    from protoformer.train import checkpoint_dcp

    pg = ProcessGroups.from_torchrun(tp=1)
    torch.manual_seed(0)
    model = build_gpt(gpt_config(), pg)
    FullyShardedDataParallel(model, pg, device())
    optimizer = optimizer_for(model)
    save_sharded_checkpoint(run_dir, 2, model, optimizer, {}, pg=pg, rng_state=None)
    real_save = checkpoint_dcp._dcp_save  # pyright: ignore[reportPrivateUsage]

    def write_then_crash(*args: object, **kwargs: object) -> object:
        real_save(*args, **kwargs)  # the shards are on disk, the step not yet published
        raise RuntimeError("killed midway")

    checkpoint_dcp._dcp_save = write_then_crash  # pyright: ignore[reportPrivateUsage]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # step 4's weights differ from step 2's
    with pytest.raises(RuntimeError, match="killed midway"):
        save_sharded_checkpoint(run_dir, 4, model, optimizer, {}, pg=pg, rng_state=None)


def test_a_sharded_save_killed_midway_leaves_the_last_checkpoint(tmp_path: Path) -> None:
    run(save_then_die_midway, 2, str(tmp_path))
    from protoformer.train.checkpoint import latest_checkpoint, load_checkpoint

    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest == tmp_path / "checkpoints" / "step_000002"
    assert not (tmp_path / "checkpoints" / "step_000004").exists()
    torch.manual_seed(0)
    expected = build_gpt(gpt_config(), None)  # the same initial weights as the saved run's
    torch.manual_seed(5)
    model = build_gpt(gpt_config(), None)
    load_checkpoint(latest, model)
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        close(a.detach(), b.detach(), f"step-2 {name}")
