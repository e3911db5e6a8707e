"""The loss of a global batch under data parallelism, and evaluation on fixed batches.

Every rank draws the same global batch and keeps the rows of its data-parallel replica
(`replica_rows`); a reported loss is the mean over the replicas (`replica_mean`), i.e. the
loss of the global batch. The model's `config.bf16` decides bf16 autocast (a run sets it from
`--precision`: by default on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from protoformer.models import GPTModel
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.parallel.pipeline_schedule import PipelineParallel

__all__ = ["evaluate", "evaluate_pipeline", "mean_loss", "replica_mean", "replica_mean_tensor",
           "replica_rows"]


def mean_loss(model: torch.nn.Module, batch: Tensor, device: torch.device) -> Tensor:
    """Mean loss of `model` (a GPTModel, or one wrapped in DistributedDataParallel)."""
    batch = batch.to(device, non_blocking=True)  # [b, s + 1]
    inputs, labels = batch[:, :-1], batch[:, 1:]  # [b, s], [b, s]
    # bf16 autocast happens inside the model when its config.bf16 is set (--precision).
    loss = model(inputs, labels, loss_reduction="mean")  # [], averaged by the model
    if not isinstance(loss, Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(loss).__name__}, not the "
                        "loss tensor")
    return loss.float()


def replica_rows(batch: Tensor, pg: ProcessGroups) -> Tensor:
    """This data-parallel replica's share of a global batch `[B, ...]` (`[B / dp, ...]`)."""
    share = batch.shape[0] // pg.dp_size
    return batch[pg.dp_rank * share:(pg.dp_rank + 1) * share]


def replica_mean_tensor(value: Tensor, pg: ProcessGroups) -> Tensor:
    """The mean of a scalar over the data-parallel replicas, left on the device (no host sync)."""
    if pg.dp_size == 1:
        return value.detach()
    total = all_reduce_in_place(value.detach().float().clone(), pg.dp)
    return total / pg.dp_size


def replica_mean(value: Tensor, pg: ProcessGroups) -> float:
    """The mean of a scalar over the data-parallel replicas (the value itself with one)."""
    if pg.dp_size == 1:
        return float(value.item())
    total = all_reduce_in_place(value.detach().float().clone(), pg.dp)
    return float(total.item()) / pg.dp_size


def evaluate(model: GPTModel, batches: list[Tensor], device: torch.device,
             pg: ProcessGroups | None = None) -> float:
    """Mean loss over fixed batches, in eval mode and without gradients.

    Under data parallelism each replica evaluates its rows of every batch and the result is
    the mean over the replicas (call on every rank).
    """
    pg = pg if pg is not None else ProcessGroups()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [replica_mean(mean_loss(model, replica_rows(batch, pg), device), pg)
                      for batch in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def evaluate_pipeline(pipeline: PipelineParallel, batches: list[Tensor], device: torch.device,
                      pg: ProcessGroups) -> float:
    """`evaluate` through the pipeline schedule (forward only): the mean loss over fixed
    batches and the data-parallel replicas, on every rank."""
    losses = [replica_mean(pipeline.evaluate(replica_rows(batch, pg), device), pg)
              for batch in batches]
    return sum(losses) / len(losses)
