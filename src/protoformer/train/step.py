"""One optimizer step: forward and backward over micro-batches, gradients completed, clipped, applied.

`train_step` takes this replica's rows of the global batch, splits them into micro-batches
(gradient accumulation: `rows / micro_batch_size` forward/backward passes, each scaled so that
the accumulated gradient is the gradient of the mean loss over all the rows), lets the
`DataParallel` wrapper complete the gradients, clips them to the global norm and steps the
optimizer. A mixture-of-experts model's auxiliary losses (`aux_losses`, the model's tracker)
join each micro-batch's loss; `after_optimizer_step` runs once per step (the routers' expert
bias update). It reads nothing back to the host: the loss (the mean over the data-parallel
replicas, i.e. the global batch's loss) and the gradient norm come back as device scalars,
read when they are logged.

Under pipeline parallelism `pipeline_train_step` replaces the micro-batch loop: the pipeline
schedule runs the micro-batches over the stages, then the gradients are completed over the
tensor- and data-parallel groups (an all-reduce after the pipeline, no DDP wrapper), clipped
to the norm over all stages and applied. MoE auxiliary losses reach the backward through the
activations (see `pipeline_schedule`); the step reports them as the one-process step does,
and updates the expert biases of this rank's routers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from protoformer.parallel.data_parallel import DataParallel
from protoformer.parallel.grads import clip_grad_norm_
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.pipeline_schedule import PipelineParallel
from protoformer.train.loss import mean_loss, replica_mean_tensor
from protoformer.transformer.moe.aux_loss import MoEAuxLossTracker

__all__ = ["StepOutput", "micro_batch_count", "pipeline_train_step", "train_step"]


@dataclass(frozen=True)
class StepOutput:
    """What a step computed, still on the device (reading it synchronises)."""

    loss: Tensor  # [] float32: the global batch's mean loss (mean over the replicas)
    grad_norm: Tensor  # [] float32: the global gradient norm before clipping
    aux_loss: Tensor | None = None  # [] float32: the MoE auxiliary losses, the same mean


def micro_batch_count(global_batch_size: int, micro_batch_size: int | None, dp_size: int) -> int:
    """Micro-batches per replica per step: `global / (micro * dp)`; a ValueError if uneven."""
    if global_batch_size % dp_size != 0:
        raise ValueError(f"--global-batch-size (--batch-size) {global_batch_size} must be "
                         f"divisible by the data-parallel size {dp_size}: each replica takes an "
                         "equal share of every batch")
    share = global_batch_size // dp_size
    micro = share if micro_batch_size is None else micro_batch_size
    if share % micro != 0:
        raise ValueError(f"--micro-batch-size {micro} must divide each replica's share of the "
                         f"global batch ({global_batch_size} / data-parallel size {dp_size} = "
                         f"{share}); choose --global-batch-size = micro x data-parallel x "
                         "accumulation steps")
    return share // micro


def train_step(data_parallel: DataParallel, optimizer: Optimizer, rows: Tensor, *,
               micro_batches: int, parameters: Sequence[Tensor], grad_clip: float,
               pg: ProcessGroups, device: torch.device,
               aux_losses: MoEAuxLossTracker | None = None,
               after_optimizer_step: Callable[[], None] | None = None) -> StepOutput:
    """One optimizer step on this replica's `rows` `[b, s + 1]` (token windows; the last
    column is only a label). The learning rate is set on `optimizer` beforehand."""
    optimizer.zero_grad(set_to_none=True)
    chunks = rows.chunk(micro_batches) if micro_batches > 1 else (rows,)  # [b / m, s + 1] each
    total: Tensor | None = None
    aux_total: Tensor | None = None
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        with contextlib.nullcontext() if last else data_parallel.accumulating():
            loss = mean_loss(data_parallel.module, chunk, device)  # []
            aux = aux_losses.total() if aux_losses is not None else None  # [] or None
            objective = loss if aux is None else loss + aux
            torch.autograd.backward(objective if micro_batches == 1 else objective / micro_batches)
        detached = loss.detach()
        total = detached if total is None else total + detached
        if aux is not None:
            aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
    assert total is not None
    data_parallel.finish_grads()
    norm = clip_grad_norm_(parameters, grad_clip, pg)
    optimizer.step()  # pyright: ignore[reportUnknownMemberType]  # torch leaves `closure` unannotated
    if after_optimizer_step is not None:
        after_optimizer_step()
    mean = total if micro_batches == 1 else total / micro_batches
    aux_mean = None if aux_total is None else replica_mean_tensor(aux_total / micro_batches, pg)
    return StepOutput(loss=replica_mean_tensor(mean, pg), grad_norm=norm, aux_loss=aux_mean)


def pipeline_train_step(pipeline: PipelineParallel, data_parallel: DataParallel,
                        optimizer: Optimizer, rows: Tensor, *, parameters: Sequence[Tensor],
                        grad_clip: float, pg: ProcessGroups, device: torch.device) -> StepOutput:
    """One optimizer step of this pipeline rank on this replica's `rows` `[b, s + 1]`
    (`pipeline.microbatches` micro-batches); the loss is the global batch's on every rank.
    `data_parallel` (not wrapping the stages: `ReplicatedDataParallel(..., wrap=False)`)
    completes the gradients after the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss = pipeline.step(rows, device)  # [] from the last stage
    aux = pipeline.take_aux_loss(device)  # [] summed over the stages, or None (dense)
    data_parallel.finish_grads()
    norm = clip_grad_norm_(parameters, grad_clip, pg)  # over the tp, pp (and sharded dp) groups
    optimizer.step()  # pyright: ignore[reportUnknownMemberType]  # torch leaves `closure` unannotated
    if pipeline.moe:
        pipeline.module.update_expert_bias()  # this rank's routers, once per step
    return StepOutput(loss=replica_mean_tensor(loss, pg), grad_norm=norm,
                      aux_loss=None if aux is None else replica_mean_tensor(aux, pg))
