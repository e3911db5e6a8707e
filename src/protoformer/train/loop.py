"""The training loop: AdamW, warmup + cosine learning rate, clipping, validation, checkpoints.

Everything that decides the next step is saved in a checkpoint (weights, optimizer state,
the step, the torch RNG states and the data sampler's position), so `resume=True` continues
*exactly*: the losses after a resume are the losses the uninterrupted run would have had.
The learning rate is a pure function of the step, so it needs no state of its own.

Several processes (launched by `torchrun`): `tp` > 1 splits the model over that many ranks
(tensor parallelism, `sequence_parallel` optionally); the rest of the world is data-parallel
replicas (`DistributedDataParallel` over the data-parallel group). Every rank draws the same
global batch and keeps the rows of its data-parallel rank; the logged loss is the mean over
the replicas, i.e. the loss of the global batch. Only global rank 0 logs, shows progress and
plots. Checkpoints hold one weight/optimizer file per tensor-parallel rank and every rank's
RNG states (`save_distributed_checkpoint`), so a resume with the same launch is exact.

The run's options are `protoformer.train.options`, its model `protoformer.train.run_model`,
the loss of a batch over the replicas `protoformer.train.loss`, and what its checkpoints hold
besides the weights `protoformer.train.run_state`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim import AdamW

from protoformer.backends import get_backend
from protoformer.distributed import LaunchEnvironment, init_distributed, wrap_data_parallel
from protoformer.models import GPTModel
from protoformer.parallel.grads import (
    clip_grad_norm_,
    compute_deferred_weight_grads,
    finalize_model_grads,
)
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.random import model_parallel_manual_seed
from protoformer.recipes import get_preset
from protoformer.train.checkpoint import JSONValue, latest_checkpoint, read_state, save_checkpoint
from protoformer.train.checkpoint_dist import save_distributed_checkpoint
from protoformer.train.data import BYTE_VOCAB_SIZE, BatchSampler, load_corpus, validation_batches
from protoformer.train.loss import evaluate, mean_loss, replica_mean, replica_rows
from protoformer.train.options import TrainOptions, check_resumable
from protoformer.train.plot import plot_losses
from protoformer.train.progress import TrainProgress
from protoformer.train.run_model import build_hf_model, build_preset_model, check_sizes
from protoformer.train.run_state import (
    check_same_corpus,
    config_summary,
    resume_run,
    rng_state,
    run_state,
)
from protoformer.train.schedule import WarmupCosineSchedule

__all__ = [
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
FAULT_INJECTION_VARIABLE = "PROTOFORMER_FAULT_INJECT"
"""`rank=R,step=S`: rank R raises at step S (to test that one rank's failure ends the job)."""
_DATA_PARALLEL_SEED_STRIDE = 1_000_003  # data-parallel replicas draw different dropout masks


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


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> AdamW:
    """AdamW with weight decay on matrices (2-D and up) only, not on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=options.lr, betas=options.betas, eps=1e-8)


def _process_groups(launch: LaunchEnvironment, options: TrainOptions) -> ProcessGroups:
    """Tensor- and data-parallel groups for this launch (none for a single process)."""
    tp = options.tp
    if not launch.is_distributed:
        if tp > 1:
            raise ValueError(
                f"--tp {tp} splits the model over {tp} processes, but this is a single process; "
                f"launch with: torchrun --nproc-per-node {tp} -m protoformer.cli train --tp {tp} "
                "...")
        return ProcessGroups()
    if launch.world_size % tp != 0:
        raise ValueError(f"--tp {tp} must divide the number of processes {launch.world_size} "
                         "(the rest are data-parallel replicas)")
    return ProcessGroups.from_torchrun(tp=tp)


def _injected_fault(launch: LaunchEnvironment) -> int | None:
    """The step at which this rank must fail (`PROTOFORMER_FAULT_INJECT`), if any."""
    text = os.environ.get(FAULT_INJECTION_VARIABLE, "").strip()
    if not text:
        return None
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    try:
        rank, step = int(fields["rank"]), int(fields["step"])
    except (KeyError, ValueError):
        raise ValueError(f"{FAULT_INJECTION_VARIABLE}={text!r}: expected rank=R,step=S") from None
    return step if rank == launch.rank else None


class _Throughput:
    """Tokens per second: over the recent steps, since the last report, and overall."""

    def __init__(self) -> None:
        self.recent: deque[tuple[int, float]] = deque(maxlen=20)
        self.tokens = 0
        self.seconds = 0.0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.recent.append((tokens, seconds))
        self.tokens += tokens
        self.seconds += seconds
        self.total_tokens += tokens
        self.total_seconds += seconds

    def recent_rate(self) -> float:
        seconds = sum(s for _, s in self.recent)
        return sum(t for t, _ in self.recent) / seconds if seconds > 0 else 0.0

    def take(self) -> float:
        """The rate since the previous `take`."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        self.tokens, self.seconds = 0, 0.0
        return rate


def train(
    options: TrainOptions,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> TrainResult:
    """Train a model on the byte corpus and return it with its loss history.

    The model is `options.preset`'s, with the layer spec `options.spec`/`options.overrides`
    describe if given, or the Hugging Face checkpoint `options.init_from_hf` (architecture and
    weights). A checkpoint records how to rebuild it (`"layer_spec"`, `"hf_config"` in its
    state), which `resume` and `protoformer generate` use.

    Checkpoints go to `options.out_dir/checkpoints/` every `save_every` steps and at the end;
    the loss curve to `options.out_dir/loss_curve.png`. `on_step` is called after each step
    (an exception it raises stops training, as a crash would).
    """
    started = time.perf_counter()
    launch, device = init_distributed(options.device, timeout=options.dist_timeout)
    pg = _process_groups(launch, options)
    if options.batch_size % pg.dp_size != 0:
        raise ValueError(f"--batch-size {options.batch_size} must be divisible by the "
                         f"data-parallel size {pg.dp_size} (processes / --tp): each replica "
                         "takes an equal share of every batch")
    preset = get_preset(options.preset) if options.init_from_hf is None else None
    if preset is not None:  # before building: a big preset's build is slow
        check_sizes(f"preset {preset.name!r}", preset.vocab_size, preset.max_sequence_length,
                     options)
    checkpoint: Path | None = None
    saved: dict[str, JSONValue] | None = None
    if options.resume:
        checkpoint = latest_checkpoint(options.out_dir)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {options.out_dir / 'checkpoints'}; "
                             "train without --resume to start a new run")
        saved = read_state(checkpoint)
        check_resumable(saved.get("train_options"), options, checkpoint)
    corpus = load_corpus(options.data, sequence_length=options.seq_len,
                         max_bytes=options.max_corpus_bytes)
    if saved is not None and checkpoint is not None:
        check_same_corpus(saved, corpus, checkpoint)
    sampler = BatchSampler(corpus.train, options.batch_size, options.seq_len, seed=options.seed)
    fixed_validation = validation_batches(corpus.validation, options.batch_size, options.seq_len,
                                          options.eval_batches)

    # The same seed on every rank: every tensor-parallel rank initialises the same full weights
    # and keeps its slice (and the per-rank dropout streams are seeded from it).
    model_parallel_manual_seed(options.seed, pg.tp_rank)
    if options.init_from_hf is not None:
        built = build_hf_model(options.init_from_hf, device, pg, options, saved)
    else:
        assert preset is not None
        built = build_preset_model(preset, get_backend(options.backend), device, pg, options,
                                   saved, checkpoint)
    model = built.model
    model.train()
    if pg.dp_rank > 0:  # replicas start equal but draw their own dropout masks
        model_parallel_manual_seed(options.seed + _DATA_PARALLEL_SEED_STRIDE * pg.dp_rank,
                                   pg.tp_rank)
    optimizer = build_optimizer(model, options)
    schedule = WarmupCosineSchedule(max_lr=options.lr, min_lr=options.lr * options.min_lr_ratio,
                                    warmup_steps=min(options.warmup_steps, options.steps),
                                    total_steps=options.steps)
    local_params = sum(p.numel() for p in model.parameters())
    # The whole model's count: a split parameter's shard is 1 / tp of it (a replicated
    # key/value head is counted once per copy).
    num_params = sum(p.numel() * (pg.tp_size if getattr(p, "tensor_model_parallel", False) else 1)
                     for p in model.parameters())
    messages = [f"data: {corpus.source}: {corpus.num_bytes:,} bytes from {corpus.num_files} "
                f"file(s), {corpus.validation.numel():,} held out for validation"
                + (f"; skipped {len(corpus.skipped_files)} binary file(s): "
                   f"{', '.join(corpus.skipped_files[:3])}{' ...' if len(corpus.skipped_files) > 3 else ''}"
                   if corpus.skipped_files else ""),
                f"model: {built.name}, {num_params:,} parameters, on {device}; {options.steps} "
                f"steps of {options.batch_size} x {options.seq_len} bytes"]
    if built.preset is None:
        messages.append(
            f"note: the corpus is fed as bytes (token ids 0-{BYTE_VOCAB_SIZE - 1}), which mean "
            f"nothing to the model's {model.vocab_size}-token (BPE) vocabulary: this fine-tunes "
            "it on a byte-level language, not on more text in its tokenizer's tokens")
    if launch.is_distributed:
        messages.append(
            f"distributed: {launch.world_size} processes = tensor-parallel {pg.tp_size} x "
            f"data-parallel {pg.dp_size}{', sequence-parallel' if model.config.sequence_parallel else ''}"
            f" ({local_params:,} parameters per tensor-parallel rank)")
    train_losses: list[tuple[int, float]] = []
    validation_losses: list[tuple[int, float]] = []
    start_step = 0
    if not options.resume and latest_checkpoint(options.out_dir) is not None:
        messages.append(f"note: {options.out_dir / 'checkpoints'} already holds a run; its "
                        "checkpoints are replaced as this run saves (--resume continues it)")
    if checkpoint is not None:
        start_step, train_losses, validation_losses = resume_run(
            checkpoint, model, optimizer, sampler, pg=pg, launch=launch)
        # The loaded optimizer state carries the saved run's weight decay and betas; this run's
        # options apply (as its learning rate and clipping do) and are what its checkpoints record.
        for group, decay in zip(optimizer.param_groups, (options.weight_decay, 0.0), strict=True):
            group["weight_decay"] = decay
            group["betas"] = options.betas
        messages.append(f"resumed from {checkpoint} at step {start_step}")
        if start_step >= options.steps:  # the loop below runs no step
            messages.append(f"note: the checkpoint is already at step {start_step}, at or past "
                            f"--steps {options.steps}: nothing left to train; raise --steps to "
                            "train further")

    def snapshot(step: int) -> Path:
        document = run_state(built, options, sampler, train_losses, validation_losses, corpus)
        if launch.is_distributed:
            return save_distributed_checkpoint(options.out_dir, step, model, optimizer,
                                               document, pg=pg, rng_state=rng_state())
        return save_checkpoint(options.out_dir, step, model, optimizer,
                               {**document, "rng": rng_state()})

    # DDP averages the gradients over the replicas during backward; deferred weight
    # gradients arrive after it, so then the average is taken afterwards instead.
    deferred = model.config.delay_wgrad_compute
    use_ddp = pg.dp_size > 1 and not deferred
    trained: torch.nn.Module = wrap_data_parallel(model, pg, device) if use_ddp else model
    fault_step = _injected_fault(launch)
    parameters = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = options.batch_size * options.seq_len
    throughput = _Throughput()
    is_tty = sys.stdout.isatty()
    show_bar = is_tty if options.progress is None else options.progress
    with TrainProgress(total=options.steps, completed=start_step,
                       enabled=show_bar and launch.is_rank_zero,
                       silent=not launch.is_rank_zero) as progress:
        for message in messages:
            progress.note(message)
        for step in range(start_step, options.steps):
            step_started = time.perf_counter()
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if fault_step is not None and step + 1 == fault_step:
                raise RuntimeError(f"fault injected on rank {launch.rank} at step {fault_step} "
                                   f"({FAULT_INJECTION_VARIABLE})")
            loss = mean_loss(trained, replica_rows(sampler.next_batch(), pg), device)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            if deferred:
                compute_deferred_weight_grads(model)
            finalize_model_grads(model, pg, reduce_data_parallel=not use_ddp)
            grad_norm = float(clip_grad_norm_(parameters, options.grad_clip, pg))
            optimizer.step()  # pyright: ignore[reportUnknownMemberType]  # torch leaves `closure` unannotated
            loss_value = replica_mean(loss, pg)
            throughput.add(tokens_per_step, time.perf_counter() - step_started)
            completed = step + 1
            if not math.isfinite(loss_value):
                raise ValueError(f"the training loss became {loss_value} at step {completed}; "
                                 f"lower the learning rate (--lr, now {options.lr})")
            train_losses.append((completed, loss_value))
            validation_loss: float | None = None
            if completed % options.eval_every == 0 or completed == options.steps:
                validation_loss = evaluate(model, fixed_validation, device, pg)
                validation_losses.append((completed, validation_loss))
            rate = throughput.recent_rate()
            if completed % options.log_every == 0 or completed == options.steps:
                progress.report(completed, loss_value, lr, throughput.take(), validation_loss)
            else:
                progress.advance(completed, loss_value, lr, rate)
            if validation_loss is not None and completed % options.log_every != 0 \
                    and completed != options.steps:
                progress.note(f"step {completed}: validation loss {validation_loss:.4f}")
            if completed % options.save_every == 0 or completed == options.steps:
                checkpoint = snapshot(completed)
            if on_step is not None:
                on_step(StepMetrics(completed, loss_value, lr, grad_norm, rate, validation_loss))
    steps_run = max(options.steps - start_step, 0)
    loss_curve = None
    if launch.is_rank_zero:
        loss_curve = plot_losses(train_losses, validation_losses,
                                 options.out_dir / LOSS_CURVE_FILE,
                                 title=f"{built.name}: {options.batch_size} x {options.seq_len} "
                                       "bytes per step")
    if loss_curve is None and launch.is_rank_zero:
        progress.note("matplotlib is not installed; skipped the loss-curve PNG "
                      "(pip install matplotlib)")
    mean_rate = (throughput.total_tokens / throughput.total_seconds
                 if throughput.total_seconds > 0 else 0.0)
    return TrainResult(model=model, train_losses=train_losses,
                       validation_losses=validation_losses, checkpoint=checkpoint,
                       loss_curve=loss_curve, steps_run=steps_run,
                       elapsed_seconds=time.perf_counter() - started,
                       tokens_per_second=mean_rate, messages=messages)
