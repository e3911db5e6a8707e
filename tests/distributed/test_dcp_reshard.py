"""A sharded (DCP) checkpoint saved at TP=2 resumes on another layout with the same next step.

Two ranks train a tensor-parallel model (TP=2, gated MLP and one key/value group, so both
fused layouts that are not plain chunks: gate|up per rank and query heads plus a copy of the
group's key/value heads) next to a single-process reference trained on the same batches, and
save. The checkpoint is then loaded on one process (TP=1) and by two FSDP ranks (TP=1 x
FSDP=2): weights equal the reference's, and the next step (loss, gradient norm, updated
weights: the AdamW moments carried over) equals the uninterrupted reference's.

An asynchronous save copies the states before training goes on, and one that is not
published (the job killed while it is written) leaves the previous checkpoint as latest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from protoformer import TransformerConfig
from protoformer.parallel import ProcessGroups
from protoformer.parallel.data_parallel import ReplicatedDataParallel
from protoformer.parallel.fsdp import FullyShardedDataParallel
from protoformer.train.checkpoint import latest_checkpoint, load_checkpoint
from protoformer.train.checkpoint_dcp import (
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    start_sharded_checkpoint,
)
from protoformer.train.step import train_step
from tests.distributed.tp_testkit import (
    GLOBAL_BATCH,
    MAX_NORM,
    build_gpt,
    close,
    device,
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


def config() -> TransformerConfig:
    return gpt_config(gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                      num_query_groups=1, sequence_parallel=True)


def save_at_tp2(rank: int, world_size: int, run_dir: str) -> None:
    pg = ProcessGroups.from_torchrun(tp=2)
    torch.manual_seed(0)
    reference = build_gpt(single_process_twin(config()), None)
    model = build_gpt(config(), pg)
    load_reference_weights(model, reference, config(), pg.tp_rank, pg.tp_size)
    ref_optimizer, optimizer = optimizer_for(reference), optimizer_for(model)
    wrapped = ReplicatedDataParallel(model, pg, device())
    for step in range(STEPS):
        rows = token_batch(step)
        ref_loss, _ = reference_step(reference, ref_optimizer, rows)
        output = train_step(wrapped, optimizer, rows, micro_batches=1,
                            parameters=list(model.parameters()), grad_clip=MAX_NORM, pg=pg,
                            device=device())
        close(output.loss, ref_loss, f"TP=2 loss at step {step}")
    save_sharded_checkpoint(run_dir, STEPS, model, optimizer, {}, pg=pg, rng_state=None)
    if rank == 0:
        torch.save({"model": reference.state_dict(), "optimizer": ref_optimizer.state_dict()},
                   Path(run_dir) / "reference.pt")


def reference(run_dir: Path) -> tuple[nn.Module, torch.optim.AdamW]:
    model = build_gpt(single_process_twin(config()), None)
    optimizer = optimizer_for(model)
    saved = torch.load(run_dir / "reference.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return model, optimizer


def resume_at_fsdp2(rank: int, world_size: int, run_dir: str) -> None:
    pg = ProcessGroups.from_torchrun(tp=1)
    torch.manual_seed(3)  # other initial weights: the checkpoint must overwrite them all
    model = build_gpt(single_process_twin(config()), pg)
    sharded = FullyShardedDataParallel(model, pg, device())
    optimizer = optimizer_for(model)
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    load_sharded_checkpoint(checkpoint, model, optimizer, pg=pg)
    expected, ref_optimizer = reference(Path(run_dir))
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        close(full_tensor(a.detach()), b.detach(), f"FSDP=2 resumed {name}")
    rows = token_batch(STEPS)
    share = GLOBAL_BATCH // pg.dp_size
    output = train_step(sharded, optimizer, rows[rank * share:(rank + 1) * share],
                        micro_batches=1, parameters=list(model.parameters()),
                        grad_clip=MAX_NORM, pg=pg, device=device())
    ref_loss, ref_norm = reference_step(expected, ref_optimizer, rows)
    close(output.loss, ref_loss, "next-step loss at FSDP=2")
    close(output.grad_norm, ref_norm, "next-step grad norm at FSDP=2")
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        close(full_tensor(a.detach()), b.detach(), f"FSDP=2: {name} after the next step")


def test_tp2_checkpoint_resumes_at_tp1_and_at_fsdp2(tmp_path: Path) -> None:
    run(save_at_tp2, 2, str(tmp_path))
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and (checkpoint / "dcp" / ".metadata").is_file()
    # One process, no process group: TP=1.
    torch.manual_seed(1)
    model = build_gpt(single_process_twin(config()), None)
    optimizer = optimizer_for(model)
    load_sharded_checkpoint(checkpoint, model, optimizer, pg=ProcessGroups())
    expected, ref_optimizer = reference(tmp_path)
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        close(a.detach(), b.detach(), f"TP=1 resumed {name}")
    rows = token_batch(STEPS)
    loss, norm = reference_step(model, optimizer, rows)
    ref_loss, ref_norm = reference_step(expected, ref_optimizer, rows)
    close(loss, ref_loss, "next-step loss at TP=1")
    close(norm, ref_norm, "next-step grad norm at TP=1")
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        close(a.detach(), b.detach(), f"TP=1: {name} after the next step")
    run(resume_at_fsdp2, 2, str(tmp_path))


def async_saves_then_die(rank: int, world_size: int, run_dir: str) -> None:
    pg = ProcessGroups.from_torchrun(tp=1)
    torch.manual_seed(0)
    model = build_gpt(gpt_config(), pg)
    FullyShardedDataParallel(model, pg, device())
    optimizer = optimizer_for(model)
    step2 = {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(step2, Path(run_dir) / "step2.pt")
    pending = start_sharded_checkpoint(run_dir, 2, model, optimizer, {}, pg=pg, rng_state=None,
                                       asynchronous=True)
    with torch.no_grad():  # training goes on while the copy is written: must not leak into it
        for param in model.parameters():
            param.add_(1.0)
    assert pending.finish() == Path(run_dir) / "checkpoints" / "step_000002"
    pending = start_sharded_checkpoint(run_dir, 4, model, optimizer, {}, pg=pg, rng_state=None,
                                       asynchronous=True)
    # Killed before the save is published (its shards may be on disk or half-written).


def test_an_async_save_killed_before_publishing_leaves_the_last_checkpoint(
        tmp_path: Path) -> None:
    run(async_saves_then_die, 2, str(tmp_path))
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step_000002"
    assert not (tmp_path / "checkpoints" / "step_000004").exists()
    expected = torch.load(tmp_path / "step2.pt", weights_only=True)
    torch.manual_seed(5)
    model = build_gpt(gpt_config(), None)
    load_checkpoint(latest, model)
    for name, param in model.named_parameters():
        close(param.detach(), expected[name], f"step-2 {name}")
