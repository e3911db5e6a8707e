"""`TrainOptions`: what a training run is given, validated, and what of it defines the run.

`TrainOptions.to_json` is stored in every checkpoint; `check_resumable` compares it with the
options of a run that resumes from one, since the options that define what a run computes
(`RUN_DEFINING`) must not change mid-run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from protoformer.config import RecomputeGranularity
from protoformer.distributed import DEFAULT_TIMEOUT_S
from protoformer.generation.sampling import MAX_SEED
from protoformer.parallel.pipeline_schedule import resolve_schedule
from protoformer.train.checkpoint_files import CheckpointError, JSONValue
from protoformer.train.schedule import DECAY_STYLES, LRSchedule

__all__ = ["RUN_DEFINING", "TrainOptions", "check_resumable"]

# Options that define what a run computes; a resumed run must keep them. The value a
# checkpoint written before an option existed implies for it:
RUN_DEFINING = ("preset", "backend", "batch_size", "seq_len", "data", "seed", "max_corpus_bytes",
                "tp", "ep", "init_from_hf", "spec", "overrides")
_IMPLIED: dict[str, JSONValue] = {"tp": 1, "ep": 1, "init_from_hf": None, "spec": None,
                                  "overrides": []}


@dataclass
class TrainOptions:
    """Everything `train` needs; the defaults train the tiny preset on CPU in about 2 minutes."""

    preset: str = "tiny"
    steps: int = 1000
    out_dir: Path = Path("runs/tiny")
    data: Path | None = None
    batch_size: int = 16
    """The global batch: sequences per optimizer step over all data-parallel replicas
    (Megatron's `--global-batch-size`)."""
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 250
    log_every: int = 50
    seed: int = 1234
    backend: str = "local"
    device: str = "auto"
    resume: bool = False
    max_corpus_bytes: int = 8 * 1024 * 1024
    progress: bool | None = None
    """Show a rich progress bar; None: only when stdout is a terminal."""
    tp: int = 1
    """Tensor-parallel size: ranks the model is split over (launch with torchrun)."""
    ep: int = 1
    """Expert-parallel size: ranks the MoE layers' experts are split over (launch with
    torchrun; the data-parallel replicas exchange tokens with all-to-all)."""
    sequence_parallel: bool = False
    """With `tp` > 1: keep norms and dropout on slices of the sequence (less memory)."""
    dist_timeout: float = DEFAULT_TIMEOUT_S
    """Seconds a collective waits for the other ranks before the run fails."""
    init_from_hf: Path | None = None
    """A Hugging Face checkpoint directory whose architecture and weights replace the preset."""
    spec: Path | None = None
    """A layer spec file (.json, .toml, .yaml) replacing the preset's recipe."""
    overrides: tuple[str, ...] = ()
    """`PATH=VALUE` edits of the layer spec (of `spec`, else of the preset's recipe)."""
    allow: tuple[str, ...] = ()
    """Module prefixes, besides protoformer's, that the spec's builders may be imported from."""
    recompute_granularity: RecomputeGranularity | None = None
    """Activation recomputation (Megatron-Core's `--recompute-granularity`): "full" keeps only
    each layer's input and recomputes the layer in backward, "selective" recomputes core
    attention; None: the preset's setting (none)."""
    compile: bool = False
    """Compile each transformer layer with `torch.compile` (torchtitan's `compile`;
    `protoformer.models.compile_layers`); warned and eager where compilation cannot work."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the data-parallel ranks (FSDP2)
    instead of replicating them (DDP); checkpoints are then sharded (DCP)."""
    ckpt_format: str | None = None
    """Checkpoint format (Megatron-Core's names): "torch_dist" (sharded with
    `torch.distributed.checkpoint`, resumable on another --tp / --fsdp layout) or "safetensors"
    (one file per tensor-parallel rank); None: torch_dist with `fsdp` or `pp`, else
    safetensors."""
    async_save: bool = False
    """With torch_dist checkpoints: write them in a background thread (`dcp.async_save`);
    each is published when the next save starts or the run ends."""
    reshard_after_forward: bool = True
    """With `fsdp`: free each layer's gathered parameters after its forward (gather again in
    backward); False keeps them (more memory, less communication)."""
    pp: int = 1
    """Pipeline-parallel size (Megatron's `pipeline_model_parallel_size`): consecutive layer
    ranges on that many ranks, run by a `torch.distributed.pipelining` schedule."""
    pp_schedule: str | None = None
    """`1F1B` or `Interleaved1F1B`; None: 1F1B, or Interleaved1F1B with more than one
    virtual stage."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Stages per pipeline rank for Interleaved1F1B (None: 2 with it, 1 with 1F1B)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one replica; the step accumulates the gradients of
    `batch_size / (micro_batch_size * data-parallel size)` micro-batches. None: the whole
    replica share at once (no accumulation)."""
    tokenizer: str | None = None
    """A tokenizer.json (or a directory with one), or "bytes"; None: the dataset's, the Hugging
    Face checkpoint's, else bytes (see `protoformer.train.dataset`)."""
    min_lr: float | None = None
    """The schedule's floor; None: `lr * min_lr_ratio`."""
    lr_decay_style: str = "cosine"
    """cosine, linear, constant or WSD (see `protoformer.train.schedule.LRSchedule`)."""
    lr_wsd_decay_steps: int | None = None
    """WSD's decay length; None: a fifth of the steps after warmup."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 elsewhere), bf16 (autocast anywhere) or fp32."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard events (needs the tensorboard package)."""
    peak_tflops: float | None = None
    """The peak TFLOP/s of one device for MFU; None: known GPUs' data-sheet peak, else no MFU."""
    overwrite: bool = False
    """Replace the run already in `out_dir` instead of refusing to."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.data = None if self.data is None else Path(self.data)
        self.init_from_hf = None if self.init_from_hf is None else Path(self.init_from_hf)
        self.spec = None if self.spec is None else Path(self.spec)
        for name in ("overrides", "allow"):
            items: object = getattr(self, name)
            if isinstance(items, str) or not isinstance(items, (list, tuple)) \
                    or not all(isinstance(item, str) for item in items):  # pyright: ignore[reportUnknownVariableType]  # checked here
                raise ValueError(f"{name}={items!r}: must be a sequence of strings")
            setattr(self, name, tuple(items))  # pyright: ignore[reportUnknownArgumentType]  # checked above
        if self.init_from_hf is not None and (self.spec is not None or self.overrides):
            raise ValueError("init_from_hf cannot be combined with a layer spec (--spec/--set): "
                             "the Hugging Face checkpoint defines the architecture; drop one")
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches",
                     "save_every", "log_every", "max_corpus_bytes", "tp", "ep", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        micro = cast("object", self.micro_batch_size)  # from a CLI or a checkpoint: checked
        if micro is not None and (isinstance(micro, bool) or not isinstance(micro, int)
                                  or micro < 1):
            raise ValueError(f"micro_batch_size={self.micro_batch_size!r}: must be an integer >= 1")
        seed = cast("object", self.seed)  # from a CLI or a checkpoint: checked
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed={str(self.seed)[:40]}: must be an integer from 0 to 2**62 "
                             f"({MAX_SEED})")
        virtual = cast("object", self.virtual_pipeline_model_parallel_size)
        if virtual is not None and (isinstance(virtual, bool) or not isinstance(virtual, int)
                                    or virtual < 1):
            raise ValueError(f"virtual_pipeline_model_parallel_size={virtual!r}: must be an "
                             "integer >= 1")
        resolve_schedule(self.pp_schedule, self.virtual_pipeline_model_parallel_size)
        if self.pipelined:
            _check_pipeline_combinations(self)
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"recompute_granularity={self.recompute_granularity!r}: use full or "
                             "selective (or leave it unset)")
        if self.ckpt_format not in (None, "torch_dist", "safetensors"):
            raise ValueError(f"ckpt_format={self.ckpt_format!r}: use torch_dist or safetensors")
        if (self.fsdp or self.pipelined) and self.ckpt_format == "safetensors":
            raise ValueError(f"--{'fsdp' if self.fsdp else 'pp'} writes sharded checkpoints: use "
                             "--ckpt-format torch_dist (or leave the flag out)")
        if self.async_save and not self.sharded_checkpoints:
            raise ValueError("--async-save needs sharded checkpoints: add --ckpt-format "
                             "torch_dist (or --fsdp)")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}: the learning rate must be a positive number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be between 0 and 1")
        if self.min_lr is not None and not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be between 0 and lr={self.lr}")
        if self.lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"lr_decay_style={self.lr_decay_style!r}: use one of "
                             f"{', '.join(DECAY_STYLES)}")
        if self.peak_tflops is not None and not self.peak_tflops > 0.0:
            raise ValueError(f"peak_tflops={self.peak_tflops}: must be > 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r}: use auto, bf16 or fp32")
        if not (0.0 <= self.betas[0] < 1.0 and 0.0 <= self.betas[1] < 1.0):
            raise ValueError(f"betas={self.betas}: Adam's betas must be in [0, 1)")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")
        if not self.grad_clip > 0.0:
            raise ValueError(f"grad_clip={self.grad_clip}: must be > 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if not (self.dist_timeout > 0.0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"dist_timeout={self.dist_timeout}: must be a positive number of "
                             "seconds")

    @property
    def pipelined(self) -> bool:
        """Whether the steps run through a pipeline schedule: with `pp` > 1, or a schedule or
        virtual stages named with `pp` == 1 (every stage on each rank, e.g. to check the
        schedule's code path on one GPU)."""
        return (self.pp > 1 or self.pp_schedule is not None
                or self.virtual_pipeline_model_parallel_size is not None)

    def schedule(self) -> LRSchedule:
        """The learning-rate schedule these options describe."""
        warmup = min(self.warmup_steps, self.steps)
        wsd = self.lr_wsd_decay_steps
        if wsd is None:  # a fifth of the steps after warmup, at least one when there are any
            wsd = min(max((self.steps - warmup) // 5, 1), self.steps - warmup)
        return LRSchedule(max_lr=self.lr,
                          min_lr=self.lr * self.min_lr_ratio if self.min_lr is None else self.min_lr,
                          warmup_steps=warmup, total_steps=self.steps,
                          decay_style=self.lr_decay_style, wsd_decay_steps=wsd)

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are torch_dist (DCP) ones."""
        return self.ckpt_format == "torch_dist" or (
            self.ckpt_format is None and (self.fsdp or self.pipelined))

    def to_json(self) -> dict[str, JSONValue]:
        """The options as stored in a checkpoint: all but where and how the run is shown."""
        document: dict[str, JSONValue] = {}
        for item in dataclasses.fields(self):
            if item.name in ("out_dir", "resume", "progress", "dist_timeout", "overwrite"):
                continue  # where and how this run is shown, not what it computes
            value: object = getattr(self, item.name)
            if isinstance(value, Path):
                document[item.name] = str(value)
            elif item.name == "betas":
                document[item.name] = [float(beta) for beta in self.betas]
            elif item.name in ("overrides", "allow"):
                document[item.name] = [str(entry) for entry in getattr(self, item.name)]
            else:
                assert value is None or isinstance(value, (bool, int, float, str))
                document[item.name] = value
        return document


def _check_pipeline_combinations(options: TrainOptions) -> None:
    """One-line errors for what `pp` > 1 is not combined with."""
    if options.ep > 1:
        raise ValueError("--pp cannot be combined with --ep (expert parallelism inside pipeline "
                         "stages is not supported); train the MoE model with --pp and --tp/--fsdp, "
                         "or with --ep without --pp")
    if options.init_from_hf is not None:
        raise ValueError("--pp cannot be combined with --init-from-hf yet; train a preset or a "
                         "--spec with --pp")


def check_resumable(saved: JSONValue, options: TrainOptions, where: Path, *,
                    any_layout: bool = False) -> None:
    """Refuse to resume when `saved` (a checkpoint's train_options) defines a different run.

    `any_layout`: the checkpoint is a sharded (torch_dist) one, which resumes on another
    tensor- or expert-parallel size (`tp` and `ep` may change; `pp` is not run-defining)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: state.json has no 'train_options'; cannot resume")
    current = options.to_json()
    changed = [f"{name}: checkpoint {saved.get(name, _IMPLIED.get(name))!r}, now "
               f"{current.get(name)!r}"
               for name in RUN_DEFINING
               if not (any_layout and name in ("tp", "ep"))
               and saved.get(name, _IMPLIED.get(name)) != current.get(name)]
    if changed:
        raise ValueError(f"cannot resume from {where}: the run was started with different "
                         f"settings ({'; '.join(changed)}); use the same ones or a new --out")
