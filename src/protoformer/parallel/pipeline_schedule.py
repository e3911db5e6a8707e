"""A training step over pipeline stages, run by a `torch.distributed.pipelining` schedule.

`PipelineParallel` wraps this rank's stages (`protoformer.parallel.pipeline.split_stages`) in
`PipelineStage`s over the pipeline group `pg.pp` and drives them with `Schedule1F1B` (one
stage per rank) or `ScheduleInterleaved1F1B` (`virtual` stages per rank). A step splits the
replica's rows into `microbatches` micro-batches (the same count gradient accumulation would
use: `--global-batch-size / (--micro-batch-size x data-parallel size)`); the schedule
computes each micro-batch's mean loss on the last stage (`pipeline_loss`) and divides the
accumulated gradients by the micro-batch count, so they are the gradients of the mean loss
over the rows, as one process computes them.

The step's loss lives on the last stage; `step` and `evaluate` return it on every rank of the
pipeline group (summed over `pg.pp`, where the other stages contribute zero).

Mixture-of-experts layers: each router's auxiliary losses are attached to its output
activation (`MoEAuxLossTracker.attach_to_activations`), so the backward of each micro-batch
gives them the gradient 1 on whichever stage they live, and the schedule's division by the
micro-batch count makes the step's gradient that of `mean(loss_i + aux_i)` over the
micro-batches, the one-process step's objective. `take_aux_loss` returns their mean over the
micro-batches, summed over the stages (reported beside the loss, which excludes it).
torch's metadata inference (recent torch runs each stage once on placeholder tensors before
the first step) runs with the tracker paused: no losses recorded, no tokens counted. Gradients are
completed afterwards by the caller (tensor-parallel partial sums, the data-parallel
average: `finalize_model_grads`) and clipped to the global norm (`grad_norm` sums the
squares over `pg.pp`: each parameter lives on one stage).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.pipelining.stage import _PipelineStageBase  # pyright: ignore[reportPrivateUsage]  # the schedules' parameter type
from torch.distributed.tensor import DTensor

from protoformer.models.gpt import GPTModel
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.parallel.pipeline import GPTStage, StageSplit, pipeline_loss, split_stages
from protoformer.spec import apply_module
from protoformer.transformer.moe.aux_loss import MoEAuxLossTracker

__all__ = ["PIPELINE_SCHEDULES", "PipelineParallel", "check_microbatches", "resolve_schedule"]

PIPELINE_SCHEDULES = ("1F1B", "Interleaved1F1B")


def resolve_schedule(schedule: str | None, virtual: int | None) -> tuple[str, int]:
    """The schedule and virtual stages per rank from `--pp-schedule` and
    `--virtual-pipeline-model-parallel-size` (either may be left out): as Megatron-Core, more
    than one virtual stage means the interleaved schedule, which defaults to 2 per rank."""
    if schedule is not None and schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"--pp-schedule {schedule!r}: use one of {', '.join(PIPELINE_SCHEDULES)}")
    if virtual is not None and virtual < 1:
        raise ValueError(f"--virtual-pipeline-model-parallel-size {virtual}: must be >= 1")
    if schedule is None:
        schedule = "Interleaved1F1B" if virtual is not None and virtual > 1 else "1F1B"
    if schedule == "1F1B":
        if virtual is not None and virtual > 1:
            raise ValueError(f"--virtual-pipeline-model-parallel-size {virtual} needs "
                             "--pp-schedule Interleaved1F1B (1F1B holds one stage per rank)")
        return schedule, 1
    return schedule, 2 if virtual is None else virtual


def check_microbatches(microbatches: int, pp: int, schedule: str) -> None:
    """ValueError (one line) when `schedule` cannot run `microbatches` over `pp` ranks."""
    if schedule == "1F1B" and microbatches < pp:
        raise ValueError(f"--pp {pp} with the 1F1B schedule needs at least {pp} micro-batches "
                         f"per step, got {microbatches} (global batch / (micro batch x "
                         "data-parallel size)); lower --micro-batch-size or raise "
                         "--global-batch-size")
    rounds = max(1, microbatches // pp)
    if schedule == "Interleaved1F1B" and microbatches % rounds != 0:
        raise ValueError(f"--pp {pp} with the Interleaved1F1B schedule needs the micro-batch "
                         f"count ({microbatches}) to be a multiple of {rounds} (use a multiple "
                         f"of --pp {pp}); change --micro-batch-size or --global-batch-size")


class _TrainingStage(PipelineStage):
    """A `PipelineStage` whose metadata inference (recent torch runs each stage's forward and
    backward once on placeholder tensors, with gradients on, before its first step) pauses
    the model's auxiliary-loss tracker, so the routers neither record losses nor count tokens
    in it, in its forward or in a full-recompute layer's recomputation during its backward."""

    def __init__(self, submodule: GPTStage, stage_index: int, num_stages: int,
                 device: torch.device, *, group: torch.distributed.ProcessGroup | None,
                 tracker: MoEAuxLossTracker) -> None:
        super().__init__(submodule, stage_index, num_stages, device, group=group)
        self._aux_losses = tracker

    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with self._aux_losses.pause():
            return super()._forward_metadata_inference(*args, **kwargs)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType, reportAttributeAccessIssue]  # torch >= 2.12 only; older versions infer shapes under no_grad, which the routers already skip

    def _backward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with self._aux_losses.pause():
            return super()._backward_metadata_inference(*args, **kwargs)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType, reportAttributeAccessIssue]  # as above


class PipelineParallel:
    """This rank's stages of a `GPTModel` and the schedule that runs a step over them."""

    def __init__(self, model: GPTModel, pg: ProcessGroups, device: torch.device, *,
                 microbatches: int, schedule: str = "1F1B", virtual: int = 1) -> None:
        if pg.pp is None:
            raise ValueError("PipelineParallel needs the pipeline group: build the groups with "
                             "ProcessGroups.from_torchrun(pp=...)")
        schedule, virtual = resolve_schedule(schedule, virtual)
        check_microbatches(microbatches, pg.pp_size, schedule)
        self.schedule_name = schedule
        self.virtual = virtual
        self.microbatches = microbatches
        self._model = model
        self._pg = pg
        self.split: StageSplit = split_stages(model, pg, virtual)
        self.moe = model.config.num_moe_experts is not None
        # The schedule divides every gradient by the micro-batch count after the backward
        # (scale_grads): each auxiliary loss's gradient is 1 per micro-batch, as its loss's.
        model.moe_aux_losses.attach_to_activations(grad_scale=1.0)
        stages: list[_PipelineStageBase] = [
            _TrainingStage(stage, index, self.split.num_stages, device, group=pg.pp,
                           tracker=model.moe_aux_losses)
            for stage, index in zip(self.split.stages, self.split.indices, strict=True)]
        loss_fn = cast("Callable[[Tensor, Tensor], Tensor]", partial(pipeline_loss, model))
        self._schedule: PipelineScheduleSingle | PipelineScheduleMulti
        if schedule == "1F1B":
            self._schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss_fn)
        else:
            self._schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss_fn)

    @property
    def module(self) -> GPTStage:
        """This rank's parameters under their full-model names (optimizer, checkpoints)."""
        return self.split.module

    @property
    def is_first(self) -> bool:
        return 0 in self.split.indices

    @property
    def is_last(self) -> bool:
        return self.split.num_stages - 1 in self.split.indices

    def step(self, rows: Tensor, device: torch.device) -> Tensor:
        """Forward and backward of this replica's `rows` `[b, s + 1]` through the pipeline;
        the gradients are accumulated in `.grad` (a tied embedding's two copies hold the sum
        of both uses). Returns the mean loss `[]` on every rank (the language-model loss; MoE
        auxiliary losses: `take_aux_loss`)."""
        loss = self._run(rows, device, train=True)
        self._sum_tied_embedding_grads()
        return loss

    def _sum_tied_embedding_grads(self) -> None:
        """Sum the gradients of a tied embedding's copies on the first and the last stage over
        the embedding group (Megatron-Core's `_allreduce_word_embedding_grads`)."""
        module = self.split.module
        if (self._pg.embd is None or module.embedding is None
                or not self._model.share_embeddings_and_output_weights):
            return
        grad = module.embedding.weight.grad
        if grad is None:
            raise RuntimeError("pipeline: the tied embedding has no gradient after the "
                               "schedule's backward")
        local = grad.to_local() if isinstance(grad, DTensor) else grad  # FSDP2: this dp shard
        all_reduce_in_place(local, self._pg.embd)

    def take_aux_loss(self, device: torch.device) -> Tensor | None:
        """The MoE auxiliary losses of the last `step` `[]`: per micro-batch the sum over every
        layer, averaged over the micro-batches, on every rank of the pipeline group; None
        for a dense model. (The one-process step reports the same value.)"""
        if not self.moe:
            return None
        attached = self._model.moe_aux_losses.take_attached()  # this rank's layers
        total = (torch.zeros((), dtype=torch.float32, device=device) if attached is None
                 else attached.detach().float())
        return all_reduce_in_place(total, self._pg.pp) / self.microbatches

    @torch.no_grad()
    def evaluate(self, rows: Tensor, device: torch.device) -> Tensor:
        """The mean loss `[]` of `rows` `[b, s + 1]` (forward only, eval mode), on every rank."""
        module = self.split.module
        was_training = module.training
        module.eval()
        try:
            if self._pg.pp_size == 1:  # every stage here: no schedule needed to chain them
                return self._forward_alone(rows.to(device, non_blocking=True))
            return self._run(rows, device, train=False)
        finally:
            module.train(was_training)

    def _forward_alone(self, rows: Tensor) -> Tensor:
        """The mean loss `[]` of `rows` `[b, s + 1]` through this rank's stages in order (torch's
        schedules cannot pass activations between local stages without a backward)."""
        outputs = rows[:, :-1]  # [b, s]
        for stage in self.split.stages:
            outputs = apply_module(stage)(outputs)  # [s, b, h], then the logits [s, b, v / tp]
        return pipeline_loss(self._model, outputs, rows[:, 1:]).detach()

    def _run(self, rows: Tensor, device: torch.device, *, train: bool) -> Tensor:
        rows = rows.to(device, non_blocking=True)
        # Contiguous: torch's stages check each micro-batch's strides against the first one's
        # (torch 2.11 on CUDA refuses the [b, s] views of `[b, s + 1]` rows: stride s + 1).
        inputs, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # [b, s] each
        args = (inputs,) if self.is_first else ()
        target = labels if self.is_last else None
        losses: list[Tensor] = []
        run = cast("Callable[..., object]",
                   self._schedule.step if train else self._schedule.eval)  # pyright: ignore[reportUnknownMemberType]  # torch leaves *args unannotated
        run(*args, target=target, losses=losses)
        if self.is_last:
            loss = torch.stack([loss.detach().float() for loss in losses]).mean()  # []
        else:
            loss = torch.zeros((), dtype=torch.float32, device=device)
        return all_reduce_in_place(loss, self._pg.pp)
