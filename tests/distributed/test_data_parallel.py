"""Data parallelism composed with tensor parallelism trains exactly like one process.

Four processes form DP=2 x TP=2 (`ProcessGroups.from_torchrun(tp=2)`); each data-parallel
replica takes half of the global batch. A few AdamW steps with gradient clipping (the
tensor-parallel global norm) must give the same losses and the same final weights as a
single-process model trained on the whole global batch, which every rank also trains itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from protoformer import TransformerConfig
from protoformer.distributed import wrap_data_parallel
from protoformer.parallel import ProcessGroups
from protoformer.parallel.grads import clip_grad_norm_, finalize_model_grads
from protoformer.parallel.mappings import all_reduce_in_place
from tests.distributed.tp_testkit import (
    GLOBAL_BATCH,
    MAX_NORM,
    build_gpt,
    close,
    compare_params_and_grads,
    device,
    gpt_config,
    load_reference_weights,
    mla_config,
    optimizer_for,
    run,
    single_process_twin,
    token_batch,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

STEPS = 3


def train_and_compare(rank: int, config: TransformerConfig, pg: ProcessGroups, *,
                      use_ddp: bool, what: str) -> None:
    torch.manual_seed(0)
    reference = build_gpt(single_process_twin(config), None)
    model = build_gpt(config, pg)
    load_reference_weights(model, reference, config, pg.tp_rank, pg.tp_size)
    wrapped = wrap_data_parallel(model, pg, device()) if use_ddp else model
    ref_optimizer, optimizer = optimizer_for(reference), optimizer_for(model)
    share = GLOBAL_BATCH // pg.dp_size
    rows = slice(pg.dp_rank * share, (pg.dp_rank + 1) * share)  # this replica's share

    for step in range(STEPS):
        tokens = token_batch(step)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        ref_loss = reference(ids, labels).mean()
        ref_loss.backward()
        ref_norm = clip_grad_norm_(reference.parameters(), MAX_NORM)
        ref_optimizer.step()
        ref_optimizer.zero_grad(set_to_none=True)

        loss = wrapped(ids[rows], labels[rows]).mean()
        loss.backward()
        finalize_model_grads(model, pg, reduce_data_parallel=not use_ddp)
        norm = clip_grad_norm_(model.parameters(), MAX_NORM, pg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        global_loss = all_reduce_in_place(loss.detach().clone(), pg.dp) / pg.dp_size
        close(global_loss, ref_loss.detach(), f"{what}: loss at step {step}")
        close(norm, ref_norm, f"{what}: grad norm at step {step}")
        assert float(norm) > MAX_NORM, f"{what}: clipping never acted"
    compare_params_and_grads(model, reference, config, pg.tp_rank, pg.tp_size,
                             what=f"{what} after {STEPS} steps", grads=False)


def check_dp_times_tp(rank: int, world_size: int) -> None:
    pg = ProcessGroups.from_torchrun(tp=2)
    assert (pg.tp_size, pg.dp_size) == (2, world_size // 2)
    assert pg.tp_rank == rank % 2 and pg.dp_rank == rank // 2  # tensor-parallel-first layout
    config = gpt_config(sequence_parallel=True, gated_linear_unit=True, num_query_groups=1,
                        activation_func=torch.nn.functional.silu)
    train_and_compare(rank, config, pg, use_ddp=True, what="gpt, DDP, sequence parallel")
    train_and_compare(rank, mla_config(), pg, use_ddp=False, what="mla, manual DP average")


@pytest.mark.slow  # four processes
def test_data_parallel_times_tensor_parallel_trains_like_one_process() -> None:
    run(check_dp_times_tp, 4, timeout_s=240)


def check_pure_data_parallel(rank: int, world_size: int) -> None:
    pg = ProcessGroups.from_torchrun(tp=1)
    assert pg.tp_size == 1 and pg.dp_size == world_size
    train_and_compare(rank, gpt_config(), pg, use_ddp=True, what="gpt, DDP, no TP")


def test_data_parallel_alone_trains_like_one_process() -> None:
    run(check_pure_data_parallel, 2)
