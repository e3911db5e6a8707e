"""Setting up a training run: processes, data, model, optimizer, data parallelism, resume.

`setup_run` does everything before the first step and returns it as a `TrainRun`: the launch
and process groups, the corpus and its sampler, the model (built, seeded, possibly loaded from
the latest checkpoint), the optimizer, the learning-rate schedule and the `DataParallel`
wrapper the step drives, with the messages the run prints first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.optim import AdamW

from protoformer.backends import get_backend
from protoformer.distributed import LaunchEnvironment, init_distributed, local_peer_pids
from protoformer.models import GPTModel, compile_layers
from protoformer.models.stage_parts import StageParts
from protoformer.parallel.data_parallel import DataParallel, ReplicatedDataParallel
from protoformer.parallel.fsdp import (
    FullyShardedDataParallel,
    FullyShardedStages,
    mixed_precision_policy,
)
from protoformer.parallel.groups import ProcessGroups, single_process_group
from protoformer.parallel.parameters import parallel_metadata
from protoformer.parallel.pipeline import stage_parts
from protoformer.parallel.pipeline_schedule import (
    PipelineParallel,
    check_microbatches,
    resolve_schedule,
)
from protoformer.parallel.random import model_parallel_manual_seed
from protoformer.recipes import get_preset
from protoformer.train.checkpoint import JSONValue, latest_checkpoint, read_state
from protoformer.train.checkpoint_dcp import is_sharded_checkpoint, layout_change_note
from protoformer.train.data import BatchSampler, validation_batches
from protoformer.train.dataset import TrainingData, load_training_data, resolve_run_tokenizer
from protoformer.train.options import TrainOptions, check_resumable
from protoformer.train.run_dir import check_run_directory
from protoformer.train.run_model import (
    RunModel,
    build_hf_model,
    build_preset_model,
    check_sizes,
    check_training_memory,
    run_vocab_size,
)
from protoformer.train.run_state import check_same_corpus, resume_run
from protoformer.train.schedule import LRSchedule
from protoformer.train.step import micro_batch_count
from protoformer.train.tokenizer import BYTE_VOCAB_SIZE, RunTokenizer
from protoformer.watchdog import Watchdog

__all__ = ["TrainRun", "build_optimizer", "model_parameter_count", "setup_run"]

_DATA_PARALLEL_SEED_STRIDE = 1_000_003  # data-parallel replicas draw different dropout masks


@dataclass
class TrainRun:
    """Everything a run's steps and hooks share, set up by `setup_run`."""

    options: TrainOptions
    launch: LaunchEnvironment
    device: torch.device
    pg: ProcessGroups
    data: TrainingData  # the tokens and the tokenizer that made them
    sampler: BatchSampler
    validation: list[Tensor]  # the fixed validation batches, [batch_size, seq_len + 1] each
    built: RunModel
    optimizer: AdamW
    schedule: LRSchedule
    data_parallel: DataParallel
    micro_batches: int  # per replica per step (gradient accumulation, or pipeline micro-batches)
    pipeline: PipelineParallel | None = None  # with --pp: this rank's stages and the schedule
    start_step: int = 0
    checkpoint: Path | None = None  # the one resumed from, then the latest saved
    train_losses: list[tuple[int, float]] = field(default_factory=list[tuple[int, float]])
    validation_losses: list[tuple[int, float]] = field(default_factory=list[tuple[int, float]])
    messages: list[str] = field(default_factory=list[str])
    watchdog: Watchdog | None = None  # under torchrun: ends the job when progress stops

    def beat(self, what: str) -> None:
        """Report progress to the watchdog (a no-op in a single process)."""
        if self.watchdog is not None:
            self.watchdog.beat(what)

    @property
    def model(self) -> GPTModel:
        return self.built.model

    @property
    def trained(self) -> torch.nn.Module:
        """The parameters this rank trains, under the model's names: the model, or with
        --pp this rank's pipeline stages (the rest of `model` is on the meta device)."""
        return self.pipeline.module if self.pipeline is not None else self.built.model

    @property
    def tokenizer(self) -> RunTokenizer:
        return self.data.tokenizer

    @property
    def bf16(self) -> bool:
        """Whether the forward runs under bf16 autocast (`--precision`)."""
        return uses_bf16(self.options.precision, self.device)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for `--bf16`, and by default (`auto`) on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> AdamW:
    """AdamW with weight decay on matrices (2-D and up) only, not on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=options.lr, betas=options.betas, eps=1e-8)


def _check_pipeline(options: TrainOptions, launch: LaunchEnvironment) -> None:
    """--pp needs torchrun (the unsupported combinations are refused by TrainOptions)."""
    if options.pp == 1:
        return
    if not launch.is_distributed:
        raise ValueError(f"--pp {options.pp} splits the model over {options.pp} processes, but "
                         f"this is a single process; launch with: torchrun --nproc-per-node "
                         f"{options.pp} -m protoformer.cli train --pp {options.pp} ...")


def model_parameter_count(model: torch.nn.Module, tp_size: int) -> int:
    """The whole model's parameter count from one tensor-parallel rank's shard: a split
    parameter's shard is 1 / tp of it (a replicated key/value head counts once per copy)."""
    return sum(p.numel() * (tp_size if parallel_metadata(p).tensor_model_parallel else 1)
               for p in model.parameters())


def _process_groups(launch: LaunchEnvironment, options: TrainOptions,
                    device: torch.device) -> ProcessGroups:
    """Tensor- and data-parallel groups for this launch (none for a single process)."""
    tp, ep = options.tp, options.ep
    if not launch.is_distributed:
        for flag, size in (("--tp", tp), ("--ep", ep)):
            if size > 1:
                raise ValueError(
                    f"{flag} {size} splits the model over {size} processes, but this is a single "
                    f"process; launch with: torchrun --nproc-per-node {size} -m protoformer.cli "
                    f"train {flag} {size} ...")
        if options.pipelined:  # every stage here; the stages need a (one-process) group
            return ProcessGroups(pp=single_process_group(device))
        return ProcessGroups()
    if launch.world_size % (tp * options.pp) != 0:
        what = f"--tp {tp}" + (f" x --pp {options.pp}" if options.pp > 1 else "")
        raise ValueError(f"{what} must divide the number of processes {launch.world_size} "
                         "(the rest are data-parallel replicas)")
    if options.pipelined:
        return ProcessGroups.from_torchrun(tp=tp, pp=options.pp, pipeline=True)
    if (launch.world_size // tp) % ep != 0:
        raise ValueError(f"--ep {ep} must divide the data-parallel size {launch.world_size // tp} "
                         f"({launch.world_size} processes / --tp {tp}): expert parallelism "
                         "splits the data-parallel replicas")
    return ProcessGroups.from_torchrun(tp=tp, ep=ep)


def _saved_run(options: TrainOptions) -> tuple[Path | None, dict[str, JSONValue] | None]:
    """With `options.resume`, the latest checkpoint and its state (checked resumable)."""
    if not options.resume:
        return None, None
    checkpoint = latest_checkpoint(options.out_dir)
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint in {options.out_dir / 'checkpoints'}; "
                         "train without --resume to start a new run")
    saved = read_state(checkpoint)
    check_resumable(saved.get("train_options"), options, checkpoint,
                    any_layout=is_sharded_checkpoint(saved))
    return checkpoint, saved


def _describe(run: TrainRun) -> list[str]:
    """The messages a run prints before its first step."""
    options, model, pg = run.options, run.model, run.pg
    unit = "bytes" if run.tokenizer.is_bytes else "tokens"
    messages = [run.data.description,
                f"model: {run.built.name}, {model_parameter_count(model, pg.tp_size):,} "
                f"parameters, vocabulary {model.vocab_size:,}, on {run.device}"
                f"{' (bf16 autocast)' if run.bf16 else ''}; {options.steps} steps of "
                f"{options.batch_size} x {options.seq_len} {unit}"
                + (f" ({run.micro_batches} micro-batches of {options.micro_batch_size} per "
                   "replica)" if run.micro_batches > 1 else "")]
    if run.built.preset is None and run.tokenizer.is_bytes:
        messages.append(
            f"note: the corpus is fed as bytes (token ids 0-{BYTE_VOCAB_SIZE - 1}), which mean "
            f"nothing to the model's {model.vocab_size}-token (BPE) vocabulary: this fine-tunes "
            "it on a byte-level language, not on more text in its tokenizer's tokens")
    if run.pipeline is not None and not run.launch.is_distributed:
        messages.append(f"pipeline schedule on this process alone:"
                        f"{_pipeline_description(run.pipeline).removeprefix(' x')}")
    if run.launch.is_distributed:
        local_params = sum(p.numel() for p in run.trained.parameters())
        messages.append(
            f"distributed: {run.launch.world_size} processes = tensor-parallel {pg.tp_size} x "
            f"data-parallel {pg.dp_size} ({run.data_parallel.name})"
            f"{_pipeline_description(run.pipeline)}"
            f"{f', experts over {pg.ep_size} expert-parallel ranks' if pg.ep_size > 1 else ''}"
            f"{', sequence-parallel' if model.config.sequence_parallel else ''}"
            f" ({local_params:,} parameters on rank 0)")
    return messages


def _start_watchdog(launch: LaunchEnvironment, options: TrainOptions) -> Watchdog | None:
    """Under torchrun, a running watchdog bounding the run by `options.dist_timeout`."""
    if not launch.is_distributed:
        return None
    watchdog = Watchdog(options.dist_timeout, rank=launch.rank, world_size=launch.world_size,
                        peers=local_peer_pids())
    watchdog.start()
    return watchdog
def _pipeline_description(pipeline: PipelineParallel | None) -> str:
    if pipeline is None:
        return ""
    virtual = (f", {pipeline.virtual} virtual stages per rank" if pipeline.virtual > 1 else "")
    return (f" x pipeline-parallel {pipeline.split.num_stages // pipeline.virtual} "
            f"({pipeline.schedule_name}{virtual}, {pipeline.microbatches} micro-batches)")


def setup_run(options: TrainOptions) -> TrainRun:
    """Everything before the first step (collective under torchrun: call on every rank).

    Under torchrun the returned run's watchdog is running (stop it when done: `train` does);
    if setup fails it is stopped before the error propagates.
    """
    check_run_directory(options.out_dir, resume=options.resume, overwrite=options.overwrite)
    launch, device = init_distributed(options.device, timeout=options.dist_timeout)
    watchdog = _start_watchdog(launch, options)
    try:
        run = _setup(options, launch, device, watchdog)
    except BaseException:
        if watchdog is not None:
            watchdog.stop()
        raise
    run.watchdog = watchdog
    return run


def _setup(options: TrainOptions, launch: LaunchEnvironment, device: torch.device,
           watchdog: Watchdog | None) -> TrainRun:
    def beat(what: str) -> None:
        if watchdog is not None:
            watchdog.beat(what)

    _check_pipeline(options, launch)
    checkpoint, saved = _saved_run(options)
    if options.pipelined and saved is not None and not is_sharded_checkpoint(saved):
        raise ValueError(f"--resume: {checkpoint} is in the per-rank safetensors format, which "
                         "pipeline stages cannot load; resume it without --pp / --pp-schedule "
                         "(pipelined runs write sharded checkpoints)")
    pg = _process_groups(launch, options, device)
    beat("process groups")
    micro_batches = micro_batch_count(options.batch_size, options.micro_batch_size, pg.dp_size)
    pp_schedule, virtual = resolve_schedule(options.pp_schedule,
                                            options.virtual_pipeline_model_parallel_size)
    if options.pipelined:
        check_microbatches(micro_batches, options.pp, pp_schedule)
    tokenizer = resolve_run_tokenizer(tokenizer=options.tokenizer, data=options.data,
                                      init_from_hf=options.init_from_hf, checkpoint=checkpoint)
    preset = get_preset(options.preset) if options.init_from_hf is None else None
    vocab_size = 0
    parts: StageParts | None = None  # with --pp: this rank builds only its stages
    if preset is not None:  # before building: a big preset's build is slow
        vocab_size = _saved_vocab_size(saved) or run_vocab_size(
            preset.vocab_size, tokenizer.vocab_size, is_bytes=tokenizer.is_bytes,
            tp_size=options.tp)
        check_sizes(f"preset {preset.name!r}", vocab_size, preset.max_sequence_length,
                    options, tokenizer_vocab_size=tokenizer.vocab_size)
        if pg.pp_size > 1:
            parts = stage_parts(preset.config().num_layers, pg.pp_rank, pg.pp_size, virtual)
        check_training_memory(preset.config(), vocab_size, tied=preset.tie_embeddings,
                              device=device, tp_size=pg.tp_size, name=f"preset {preset.name!r}",
                              parts=parts)
        if (options.pipelined and options.fsdp and preset.tie_embeddings
                and pg.pp_size == 1):
            raise ValueError("--fsdp with a pipeline schedule on one pipeline rank cannot "
                             "shard a tied embedding (the first and last stage would share "
                             "it); use --pp 2 or more, or drop --pp-schedule")
    data = load_training_data(options.data, tokenizer, sequence_length=options.seq_len,
                              max_corpus_bytes=options.max_corpus_bytes)
    if saved is not None and checkpoint is not None:
        check_same_corpus(saved, data, checkpoint)
    sampler = BatchSampler(data.train, options.batch_size, options.seq_len, seed=options.seed)
    validation = validation_batches(data.validation, options.batch_size, options.seq_len,
                                    options.eval_batches)
    beat("data loaded")
    bf16 = uses_bf16(options.precision, device)

    # The same seed on every rank: every tensor-parallel rank initialises the same full weights
    # and keeps its slice (and the per-rank dropout streams are seeded from it).
    model_parallel_manual_seed(options.seed, pg.tp_rank)
    if options.init_from_hf is not None:
        built = build_hf_model(options.init_from_hf, device, pg, options, saved,
                               tokenizer_vocab_size=tokenizer.vocab_size, bf16=bf16)
    else:
        assert preset is not None
        built = build_preset_model(preset, get_backend(options.backend), device, pg, options,
                                   saved, checkpoint, vocab_size=vocab_size, bf16=bf16,
                                   parts=parts)
    model = built.model
    beat("model built")
    model.train()
    # Per-layer compilation before the data-parallel wrappers (torchtitan's order).
    compiled_layers = compile_layers(model) if options.compile else 0
    if pg.dp_rank > 0:  # replicas start equal but draw their own dropout masks
        model_parallel_manual_seed(options.seed + _DATA_PARALLEL_SEED_STRIDE * pg.dp_rank,
                                   pg.tp_rank)
    data_parallel: DataParallel | None = None
    pipeline: PipelineParallel | None = None
    if options.pipelined:  # this rank's stages; the optimizer is built on their parameters
        pipeline = PipelineParallel(model, pg, device, microbatches=micro_batches,
                                    schedule=pp_schedule, virtual=virtual)
        data_parallel = (FullyShardedStages(pipeline.split, pg, device,
                                            mp_policy=mixed_precision_policy(
                                                "bf16" if device.type == "cuda" else "fp32"),
                                            reshard_after_forward=options.reshard_after_forward)
                         if options.fsdp
                         else ReplicatedDataParallel(pipeline.module, pg, device, wrap=False))
    elif options.fsdp:  # sharded before the optimizer is built on the (DTensor) shards
        data_parallel = FullyShardedDataParallel(
            model, pg, device, mp_policy=mixed_precision_policy(
                "bf16" if device.type == "cuda" else "fp32"),
            reshard_after_forward=options.reshard_after_forward)
    trained = pipeline.module if pipeline is not None else model
    optimizer = build_optimizer(trained, options)
    schedule = options.schedule()
    resumed = _resume(checkpoint, trained, optimizer, sampler, pg, launch, options)
    beat("checkpoint loaded" if resumed is not None else "optimizer built")
    if data_parallel is None:
        # Wrapped after loading: DDP broadcasts the (loaded) weights from the first replica.
        data_parallel = ReplicatedDataParallel(
            model, pg, device, delay_wgrad_compute=model.config.delay_wgrad_compute)
    run = TrainRun(options=options, launch=launch, device=device, pg=pg, data=data,
                   sampler=sampler, validation=validation, built=built, optimizer=optimizer,
                   schedule=schedule, data_parallel=data_parallel, micro_batches=micro_batches,
                   pipeline=pipeline, checkpoint=checkpoint)
    run.messages = _describe(run)
    if compiled_layers:
        run.messages.append(f"compile: {compiled_layers} transformer layers compiled with "
                            "torch.compile (the first steps include the compilation)")
    if resumed is not None:
        run.start_step, run.train_losses, run.validation_losses = resumed
        run.messages.append(f"resumed from {checkpoint} at step {run.start_step}")
        run.messages.extend(_schedule_change(saved, options, run.start_step))
        if saved is not None and is_sharded_checkpoint(saved):
            note = layout_change_note(saved, pg, launch.world_size)
            if note is not None:
                run.messages.append(note)
        if run.start_step >= options.steps:  # the loop runs no step
            run.messages.append(f"note: the checkpoint is already at step {run.start_step}, at "
                                f"or past --steps {options.steps}: nothing left to train; raise "
                                "--steps to train further")
    return run


def _saved_vocab_size(saved: dict[str, JSONValue] | None) -> int | None:
    """The vocabulary a resumed run's model was built with."""
    model = saved.get("model") if saved is not None else None
    size = model.get("vocab_size") if isinstance(model, dict) else None
    return size if isinstance(size, int) else None


def _schedule_change(saved: dict[str, JSONValue] | None, options: TrainOptions,
                     start_step: int) -> list[str]:
    """A note when a resumed run's --steps differs from the run's original: the learning-rate
    schedule is a function of the total, so from here on it is not the original curve."""
    original = saved.get("train_options") if saved is not None else None
    steps = original.get("steps") if isinstance(original, dict) else None
    if not isinstance(steps, int) or steps == options.steps:
        return []
    return [f"note: --steps {options.steps} differs from the {steps} this run was started "
            f"with; the learning-rate schedule (warmup, then cosine decay until the last step) "
            f"now ends at step {options.steps}, so from step {start_step} on the learning rate "
            f"differs from the original run's"]


def _resume(checkpoint: Path | None, trained: torch.nn.Module, optimizer: AdamW,
            sampler: BatchSampler,
            pg: ProcessGroups, launch: LaunchEnvironment, options: TrainOptions,
            ) -> tuple[int, list[tuple[int, float]], list[tuple[int, float]]] | None:
    """Load the checkpoint (if resuming): weights, optimizer, RNG, sampler; returns the step and
    the loss history."""
    if checkpoint is None:
        return None
    resumed = resume_run(checkpoint, trained, optimizer, sampler, pg=pg, launch=launch)
    # The loaded optimizer state carries the saved run's weight decay and betas; this run's
    # options apply (as its learning rate and clipping do) and are what its checkpoints record.
    for group, decay in zip(optimizer.param_groups, (options.weight_decay, 0.0), strict=True):
        group["weight_decay"] = decay
        group["betas"] = options.betas
    return resumed
