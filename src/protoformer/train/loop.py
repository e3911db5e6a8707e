"""The training loop: AdamW, warmup + a decaying learning rate, clipping, validation, checkpoints.

Everything that decides the next step is saved in a checkpoint (weights, optimizer state,
the step, the torch RNG states and the data sampler's position), so `resume=True` continues
*exactly*: the losses after a resume are the losses the uninterrupted run would have had.
The learning rate is a pure function of the step, so it needs no state of its own.

Several processes (launched by `torchrun`): `tp` > 1 splits the model over that many ranks
(tensor parallelism, `sequence_parallel` optionally), `pp` > 1 splits its layers into
pipeline stages (`protoformer.parallel.pipeline`, run by a `torch.distributed.pipelining`
schedule; checkpoints are then sharded DCP ones); the rest of the world is data-parallel
replicas (`DistributedDataParallel` over the data-parallel group). Every rank draws the same
global batch and keeps the rows of its data-parallel rank; the logged loss is the mean over
the replicas, i.e. the loss of the global batch. Only global rank 0 logs, shows progress and
plots. Checkpoints hold one weight/optimizer file per tensor-parallel rank and every rank's
RNG states (`save_distributed_checkpoint`), so a resume with the same launch is exact.

`train` is three parts: `protoformer.train.setup.setup_run` (processes, data, model,
optimizer, the `DataParallel` wrapper, resume), `protoformer.train.step.train_step` (one
optimizer step, micro-batches accumulated) and the hooks of `protoformer.train.hooks`
(evaluation, logging, checkpoints) called after each step. The run's options are
`protoformer.train.options`, its model `protoformer.train.run_model`, the loss of a batch over
the replicas `protoformer.train.loss`, and what its checkpoints hold besides the weights
`protoformer.train.run_state`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from protoformer.models import GPTModel
from protoformer.train.hooks import (
    FAULT_INJECTION_VARIABLE,
    Checkpointing,
    Evaluation,
    FaultInjection,
    LossLog,
    ProgressLog,
)
from protoformer.train.loss import evaluate, replica_rows
from protoformer.train.metrics import MetricsLog
from protoformer.train.options import TrainOptions
from protoformer.train.plot import plot_losses
from protoformer.train.progress import TrainProgress
from protoformer.train.run_dir import CONFIG_FILE
from protoformer.train.run_state import config_summary
from protoformer.train.setup import TrainRun, build_optimizer, setup_run
from protoformer.train.step import pipeline_train_step, train_step
from protoformer.train.tokenizer import RunTokenizer

__all__ = [
    "FAULT_INJECTION_VARIABLE",
    "LOSS_CURVE_FILE",
    "StepMetrics",
    "TrainOptions",
    "TrainResult",
    "build_optimizer",
    "config_summary",
    "evaluate",
    "resolve_device",
    "train",
]

LOSS_CURVE_FILE = "loss_curve.png"


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports."""

    step: int  # steps completed, counting this one
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float
    validation_loss: float | None


@dataclass
class TrainResult:
    """The trained model and where its outputs went."""

    model: GPTModel
    tokenizer: RunTokenizer  # what the model's token ids mean
    train_losses: list[tuple[int, float]]
    validation_losses: list[tuple[int, float]]
    checkpoint: Path | None
    loss_curve: Path | None
    steps_run: int
    elapsed_seconds: float
    tokens_per_second: float = 0.0
    messages: list[str] = field(default_factory=list[str])


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; `cuda` without a GPU is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested, but torch sees no CUDA device; use "
                         "--device cpu or auto")
    return torch.device(name)


def train(
    options: TrainOptions,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
    resolved_config: str | None = None,
) -> TrainResult:
    """Train a model on its data (`protoformer.train.dataset`) and return it with its losses.

    The model is `options.preset`'s, with the layer spec `options.spec`/`options.overrides`
    describe if given, or the Hugging Face checkpoint `options.init_from_hf` (architecture and
    weights). A checkpoint records how to rebuild it (`"layer_spec"`, `"hf_config"` in its
    state), which `resume` and `protoformer generate` use.

    Checkpoints go to `options.out_dir/checkpoints/` every `save_every` steps and at the end;
    the loss curve to `options.out_dir/loss_curve.png`; a line per log step to
    `options.out_dir/metrics.jsonl`. `resolved_config` (the run's options as a TOML `--config`
    file) is written to `options.out_dir/config.toml` and printed first. `on_step` is called
    after each step (an exception it raises stops training, as a crash would).
    """
    started = time.perf_counter()
    run = setup_run(options)
    rank_zero = run.launch.is_rank_zero
    show_bar = sys.stdout.isatty() if options.progress is None else options.progress
    try:
        with TrainProgress(total=options.steps, completed=run.start_step,
                           enabled=show_bar and rank_zero, silent=not rank_zero,
                           bytes_per_token=run.data.bytes_per_token) as progress, \
                MetricsLog(options.out_dir, enabled=rank_zero, tensorboard=options.tensorboard,
                           resume_step=run.start_step if options.resume else None) as metrics:
            if resolved_config is not None and rank_zero:
                path = options.out_dir / CONFIG_FILE
                path.write_text(resolved_config, encoding="utf-8")
                progress.note(f"config ({path}): " + ", ".join(
                    line for line in resolved_config.splitlines() if line.strip()))
            for message in run.messages:
                progress.note(message)
            loss_log = _run_steps(run, progress, metrics, on_step)
            loss_curve = _plot(run, progress)
    finally:
        if run.watchdog is not None:
            run.watchdog.stop()
    return TrainResult(model=run.model, tokenizer=run.tokenizer, train_losses=run.train_losses,
                       validation_losses=run.validation_losses, checkpoint=run.checkpoint,
                       loss_curve=loss_curve, steps_run=max(options.steps - run.start_step, 0),
                       elapsed_seconds=time.perf_counter() - started,
                       tokens_per_second=loss_log.throughput.mean_rate(), messages=run.messages)


def _run_steps(run: TrainRun, progress: TrainProgress, metrics: MetricsLog,
               on_step: Callable[[StepMetrics], None] | None) -> LossLog:
    """The steps from `run.start_step` to `options.steps`, each followed by the hooks."""
    options = run.options
    fault = FaultInjection(run.launch)
    loss_log = LossLog(run)
    evaluation = Evaluation(run)
    progress_log = ProgressLog(run, progress, loss_log.throughput, metrics)
    checkpointing = Checkpointing(run)
    parameters = [p for p in run.trained.parameters() if p.requires_grad]
    moe = run.model.config.num_moe_experts is not None  # aux losses, expert-bias updates
    for step in range(run.start_step, options.steps):
        step_started = time.perf_counter()
        lr = run.schedule(step)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        fault.before_step(step)
        rows = replica_rows(run.sampler.next_batch(), run.pg)  # [b / dp, s + 1]
        if run.pipeline is not None:
            output = pipeline_train_step(run.pipeline, run.data_parallel, run.optimizer, rows,
                                         parameters=parameters, grad_clip=options.grad_clip,
                                         pg=run.pg, device=run.device)
        else:
            output = train_step(run.data_parallel, run.optimizer, rows,
                                micro_batches=run.micro_batches, parameters=parameters,
                                grad_clip=options.grad_clip, pg=run.pg, device=run.device,
                                aux_losses=run.model.moe_aux_losses if moe else None,
                                after_optimizer_step=run.model.update_expert_bias if moe
                                else None)
        run.beat(f"step {step + 1}")
        report = evaluation.after_step(loss_log.record(step + 1, output, lr, step_started))
        run.beat(f"step {step + 1} loss and evaluation")
        progress_log.after_step(report)
        checkpointing.after_step(report)
        run.beat(f"step {step + 1} checkpoint")
        if on_step is not None:
            on_step(StepMetrics(report.step, report.loss, report.lr, report.grad_norm,
                                report.tokens_per_second, report.validation_loss))
    checkpointing.finish()  # an asynchronous save still being written is published
    return loss_log


def _plot(run: TrainRun, progress: TrainProgress) -> Path | None:
    """The loss curve PNG (rank 0; None elsewhere or without matplotlib)."""
    if not run.launch.is_rank_zero:
        return None
    options = run.options
    loss_curve = plot_losses(run.train_losses, run.validation_losses,
                             options.out_dir / LOSS_CURVE_FILE,
                             title=f"{run.built.name}: {options.batch_size} x {options.seq_len} "
                                   f"{'bytes' if run.tokenizer.is_bytes else 'tokens'} per step")
    if loss_curve is None:
        progress.note("matplotlib is not installed; skipped the loss-curve PNG "
                      "(pip install matplotlib)")
    return loss_curve
