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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.optim import AdamW

from protoformer.backends import BackendSpecProvider, get_backend
from protoformer.config import TransformerConfig
from protoformer.distributed import (
    DEFAULT_TIMEOUT_S,
    LaunchEnvironment,
    init_distributed,
    wrap_data_parallel,
)
from protoformer.interop import from_hf, hf_config_dict, hf_model_info, model_from_hf_config
from protoformer.models import GPTModel
from protoformer.parallel.grads import (
    clip_grad_norm_,
    compute_deferred_weight_grads,
    finalize_model_grads,
)
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.mappings import all_reduce_in_place
from protoformer.parallel.random import get_rng_tracker, model_parallel_manual_seed
from protoformer.recipes import Preset, get_preset
from protoformer.recipes.spec_data import layer_spec_from_data, stored_layer_spec
from protoformer.spec import to_dict
from protoformer.train.checkpoint import (
    STATE_FILE,
    CheckpointError,
    JSONValue,
    bytes_from_json,
    bytes_to_json,
    latest_checkpoint,
    load_distributed_checkpoint,
    read_state,
    save_checkpoint,
    save_distributed_checkpoint,
)
from protoformer.train.data import BYTE_VOCAB_SIZE, BatchSampler, load_corpus, validation_batches
from protoformer.train.plot import plot_losses
from protoformer.train.progress import TrainProgress
from protoformer.train.schedule import WarmupCosineSchedule
from protoformer.transformer.layer import TransformerLayerSubmodules

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
# Options that define what a run computes; a resumed run must keep them. The value a
# checkpoint written before an option existed implies for it:
_RUN_DEFINING = ("preset", "backend", "batch_size", "seq_len", "data", "seed", "max_corpus_bytes",
                 "tp", "init_from_hf", "spec", "overrides")
_IMPLIED: dict[str, JSONValue] = {"tp": 1, "init_from_hf": None, "spec": None, "overrides": []}
FAULT_INJECTION_VARIABLE = "PROTOFORMER_FAULT_INJECT"
"""`rank=R,step=S`: rank R raises at step S (to test that one rank's failure ends the job)."""
_DATA_PARALLEL_SEED_STRIDE = 1_000_003  # data-parallel replicas draw different dropout masks


@dataclass
class TrainOptions:
    """Everything `train` needs; the defaults train the tiny preset on CPU in about 2 minutes."""

    preset: str = "tiny"
    steps: int = 1000
    out_dir: Path = Path("runs/tiny")
    data: Path | None = None
    batch_size: int = 16
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
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches",
                     "save_every", "log_every", "max_corpus_bytes", "tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if not 0 <= self.warmup_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}: the learning rate must be a positive number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}: must be between 0 and 1")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0")
        if not self.grad_clip > 0.0:
            raise ValueError(f"grad_clip={self.grad_clip}: must be > 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if not (self.dist_timeout > 0.0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"dist_timeout={self.dist_timeout}: must be a positive number of "
                             "seconds")

    def to_json(self) -> dict[str, JSONValue]:
        document: dict[str, JSONValue] = {}
        for item in dataclasses.fields(self):
            if item.name in ("out_dir", "resume", "progress", "dist_timeout"):
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


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> AdamW:
    """AdamW with weight decay on matrices (2-D and up) only, not on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=options.lr, betas=options.betas, eps=1e-8)


def _mean_loss(model: torch.nn.Module, batch: Tensor, device: torch.device) -> Tensor:
    """Mean loss of `model` (a GPTModel, or one wrapped in DistributedDataParallel)."""
    batch = batch.to(device, non_blocking=True)  # [b, s + 1]
    inputs, labels = batch[:, :-1], batch[:, 1:]  # [b, s], [b, s]
    with _autocast(device):
        per_token = model(inputs, labels)  # [b, s]
    if not isinstance(per_token, Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(per_token).__name__}, not the "
                        "per-token loss tensor")
    return per_token.float().mean()


def _replica_rows(batch: Tensor, pg: ProcessGroups) -> Tensor:
    """This data-parallel replica's share of a global batch `[B, ...]` (`[B / dp, ...]`)."""
    share = batch.shape[0] // pg.dp_size
    return batch[pg.dp_rank * share:(pg.dp_rank + 1) * share]


def _replica_mean(value: Tensor, pg: ProcessGroups) -> float:
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
            losses = [_replica_mean(_mean_loss(model, _replica_rows(batch, pg), device), pg)
                      for batch in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def config_summary(config: TransformerConfig) -> dict[str, JSONValue]:
    """The config's fields as JSON (callables and dtypes by name), for humans reading a checkpoint."""
    summary: dict[str, JSONValue] = {"class": type(config).__name__}
    for item in dataclasses.fields(config):
        value: object = getattr(config, item.name)
        if value is None or isinstance(value, (bool, int, float, str)):
            summary[item.name] = value
        else:
            summary[item.name] = getattr(value, "__name__", None) or str(value)
    return summary


def _rng_state() -> dict[str, JSONValue]:
    state: dict[str, JSONValue] = {"torch_cpu": bytes_to_json(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        state["torch_cuda"] = [bytes_to_json(s) for s in torch.cuda.get_rng_state_all()]
    # The tensor-parallel dropout streams (per rank; see protoformer.parallel.random).
    streams: dict[str, JSONValue] = {}
    for name, devices in get_rng_tracker().get_states().items():
        streams[name] = {device: bytes_to_json(s) for device, s in devices.items()}
    state["model_parallel"] = streams
    return state


def _restore_rng(state: JSONValue) -> None:
    if not isinstance(state, dict):
        raise CheckpointError("state.json: 'rng' must be an object")
    torch.set_rng_state(bytes_from_json(state.get("torch_cpu"), what="state.json rng.torch_cpu"))
    cuda = state.get("torch_cuda")
    if isinstance(cuda, list) and torch.cuda.is_available() \
            and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([bytes_from_json(s, what="state.json rng.torch_cuda")
                                      for s in cuda])
    streams = state.get("model_parallel")
    if isinstance(streams, dict):
        tracker = get_rng_tracker()
        known = set(tracker.names())
        tracker.set_states({
            name: {device: bytes_from_json(s, what=f"state.json rng.model_parallel.{name}")
                   for device, s in devices.items()}
            for name, devices in streams.items() if isinstance(devices, dict) and name in known})


def _history(state: JSONValue, name: str) -> list[tuple[int, float]]:
    entries = state.get(name) if isinstance(state, dict) else None
    if not isinstance(entries, list):
        return []
    pairs: list[tuple[int, float]] = []
    for entry in entries:
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) \
                and isinstance(entry[1], (int, float)):
            pairs.append((entry[0], float(entry[1])))
    return pairs


def _check_resumable(saved: JSONValue, options: TrainOptions, where: Path) -> None:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: state.json has no 'train_options'; cannot resume")
    current = options.to_json()
    changed = [f"{name}: checkpoint {saved.get(name, _IMPLIED.get(name))!r}, now "
               f"{current.get(name)!r}"
               for name in _RUN_DEFINING
               if saved.get(name, _IMPLIED.get(name)) != current.get(name)]
    if changed:
        raise ValueError(f"cannot resume from {where}: the run was started with different "
                         f"settings ({'; '.join(changed)}); use the same ones or a new --out")


def _resume(checkpoint: Path, options: TrainOptions, model: GPTModel, optimizer: AdamW,
            sampler: BatchSampler, *, pg: ProcessGroups, launch: LaunchEnvironment,
            ) -> tuple[int, list[tuple[int, float]], list[tuple[int, float]]]:
    """Load everything a checkpoint holds; returns (step, train losses, validation losses)."""
    state = load_distributed_checkpoint(checkpoint, model, optimizer, pg=pg)
    _restore_rng(_rank_rng_state(state, launch, checkpoint))
    sampler_state = state.get("sampler")
    drawn = sampler_state.get("batches_drawn") if isinstance(sampler_state, dict) else None
    if not isinstance(sampler_state, dict) or not isinstance(drawn, int):
        raise CheckpointError(f"{checkpoint}: state.json lacks the data sampler position")
    sampler.load_state_dict({
        "generator": bytes_from_json(sampler_state.get("generator"),
                                     what=f"{checkpoint} sampler.generator"),
        "batches_drawn": drawn})
    step = state["step"]
    assert isinstance(step, int)  # read_state checked it
    history = state.get("history")
    return step, _history(history, "train"), _history(history, "validation")


def _rank_rng_state(state: dict[str, JSONValue], launch: LaunchEnvironment,
                    checkpoint: Path) -> JSONValue:
    """This rank's RNG states: saved per rank by a multi-process run, else the one entry."""
    per_rank = state.get("rng_per_rank")
    saved_world = len(per_rank) if isinstance(per_rank, list) else 1
    if saved_world != launch.world_size:
        raise CheckpointError(
            f"{checkpoint}: saved by a run of {saved_world} process(es), but this run has "
            f"{launch.world_size}; resume with the same launch (torchrun --nproc-per-node "
            f"{saved_world}), since every rank's random-number state is restored")
    if isinstance(per_rank, list):
        return per_rank[launch.rank]
    return state.get("rng")


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


@dataclass(frozen=True)
class _RunModel:
    """The model a run trains, and what its checkpoints record to rebuild it."""

    model: GPTModel
    name: str  # for messages and the loss curve's title
    preset: Preset | None  # None: from a Hugging Face checkpoint
    hf_config: dict[str, JSONValue] | None
    layer_spec: dict[str, JSONValue] | None  # the resolved spec, when --spec/--set gave one


def _check_sizes(name: str, vocab_size: int, max_sequence_length: int,
                 options: TrainOptions) -> None:
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"{name} has a vocabulary of {vocab_size}, but the byte-level trainer "
                         f"needs {BYTE_VOCAB_SIZE}")
    if options.seq_len > max_sequence_length:
        raise ValueError(f"seq_len={options.seq_len} exceeds {name}'s "
                         f"max_sequence_length={max_sequence_length}")


def _json_copy(values: object) -> dict[str, JSONValue]:
    """A JSON-compatible mapping (an HF config) as a checkpoint value, checked by a round trip."""
    decoded: JSONValue = json.loads(json.dumps(values))
    assert isinstance(decoded, dict)
    return decoded


def _build_model(preset: Preset, backend: BackendSpecProvider, device: torch.device,
                 pg: ProcessGroups, options: TrainOptions,
                 saved: dict[str, JSONValue] | None, checkpoint: Path | None) -> _RunModel:
    """The preset's model (or the layer spec a spec file and overrides describe), split over
    `pg` and with the run's sequence parallelism. A resumed run rebuilds the spec its
    checkpoint stored, not the (possibly edited) spec file."""
    config = preset.config()
    if options.sequence_parallel and pg.tp_size > 1:
        if options.seq_len % pg.tp_size != 0:
            raise ValueError(f"--sequence-parallel needs --seq-len ({options.seq_len}) divisible "
                             f"by --tp ({pg.tp_size})")
        config = dataclasses.replace(config, sequence_parallel=True)
    stored = saved.get("layer_spec") if saved is not None else None
    custom: TransformerLayerSubmodules | None
    if stored is not None:
        custom = stored_layer_spec(stored, allow=options.allow,
                                   where=f"{checkpoint}/{STATE_FILE} layer_spec")
        source = f"the layer spec stored in {checkpoint}"
    else:
        custom = layer_spec_from_data(preset, backend, spec_file=options.spec,
                                      overrides=options.overrides, allow=options.allow,
                                      config=config)
        source = (f"the layer spec of --spec {options.spec}" if options.spec is not None
                  else "the preset's layer spec with --set overrides")
    spec = custom if custom is not None else preset.layer_spec(backend, config)
    document = to_dict(spec) if custom is not None else None  # fails here, not at the first save
    try:
        with torch.device(device):
            model = GPTModel(config, spec, preset.vocab_size, preset.max_sequence_length, pg=pg,
                             share_embeddings_and_output_weights=preset.tie_embeddings)
    except (TypeError, ValueError) as error:
        if custom is None:
            raise
        raise ValueError(f"{source} does not fit preset {preset.name!r} (a "
                         f"{type(config).__name__}): {error}") from error
    return _RunModel(model=model, name=preset.name, preset=preset, hf_config=None,
                     layer_spec=document)


def _build_hf_model(source: Path, device: torch.device, pg: ProcessGroups,
                    options: TrainOptions, saved: dict[str, JSONValue] | None) -> _RunModel:
    """The Hugging Face checkpoint's model; a resumed run rebuilds its architecture from the
    config its checkpoint stored (the weights come from the checkpoint)."""
    if options.tp != 1 or pg.tp_size != 1:
        raise ValueError(f"--init-from-hf loads the whole model on every process; tensor "
                         f"parallelism (--tp {options.tp}) is not supported with it, use --tp 1")
    if options.backend != "local":
        raise ValueError(f"--init-from-hf builds the model with the 'local' backend (the layers "
                         f"the Hugging Face weights are converted into); --backend "
                         f"{options.backend!r} is not supported with it")
    stored = saved.get("hf_config") if saved is not None else None
    if isinstance(stored, dict):
        model = model_from_hf_config(stored, device=device)
    else:
        model = from_hf(source, dtype=torch.float32, device=device)
    name = f"{source} ({hf_model_info(model).architecture})"
    _check_sizes(name, model.vocab_size, model.max_sequence_length, options)
    return _RunModel(model=model, name=name, preset=None,
                     hf_config=_json_copy(hf_config_dict(model)), layer_spec=None)


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
        _check_sizes(f"preset {preset.name!r}", preset.vocab_size, preset.max_sequence_length,
                     options)
    checkpoint: Path | None = None
    saved: dict[str, JSONValue] | None = None
    if options.resume:
        checkpoint = latest_checkpoint(options.out_dir)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {options.out_dir / 'checkpoints'}; "
                             "train without --resume to start a new run")
        saved = read_state(checkpoint)
        _check_resumable(saved.get("train_options"), options, checkpoint)
    corpus = load_corpus(options.data, sequence_length=options.seq_len,
                         max_bytes=options.max_corpus_bytes)
    sampler = BatchSampler(corpus.train, options.batch_size, options.seq_len, seed=options.seed)
    fixed_validation = validation_batches(corpus.validation, options.batch_size, options.seq_len,
                                          options.eval_batches)

    # The same seed on every rank: every tensor-parallel rank initialises the same full weights
    # and keeps its slice (and the per-rank dropout streams are seeded from it).
    model_parallel_manual_seed(options.seed, pg.tp_rank)
    if options.init_from_hf is not None:
        built = _build_hf_model(options.init_from_hf, device, pg, options, saved)
    else:
        assert preset is not None
        built = _build_model(preset, get_backend(options.backend), device, pg, options, saved,
                             checkpoint)
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
                f"file(s), {corpus.validation.numel():,} held out for validation",
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
        start_step, train_losses, validation_losses = _resume(
            checkpoint, options, model, optimizer, sampler, pg=pg, launch=launch)
        messages.append(f"resumed from {checkpoint} at step {start_step}")

    def snapshot(step: int) -> Path:
        document: dict[str, JSONValue] = {
            "preset": built.preset.name if built.preset is not None else None,
            "backend": options.backend,
            "model": {"vocab_size": model.vocab_size,
                      "max_sequence_length": model.max_sequence_length,
                      "config": config_summary(model.config)},
            "train_options": options.to_json(),
            "sampler": {"generator": bytes_to_json(sampler.generator.get_state()),
                        "batches_drawn": sampler.batches_drawn},
            "history": {"train": [[s, v] for s, v in train_losses],
                        "validation": [[s, v] for s, v in validation_losses]},
        }
        if built.hf_config is not None:  # `generate` and `--resume` rebuild the model from it
            document["hf_config"] = built.hf_config
        if built.layer_spec is not None:
            document["layer_spec"] = built.layer_spec
        if launch.is_distributed:
            return save_distributed_checkpoint(options.out_dir, step, model, optimizer,
                                               document, pg=pg, rng_state=_rng_state())
        return save_checkpoint(options.out_dir, step, model, optimizer,
                               {**document, "rng": _rng_state()})

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
            loss = _mean_loss(trained, _replica_rows(sampler.next_batch(), pg), device)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            if deferred:
                compute_deferred_weight_grads(model)
            finalize_model_grads(model, pg, reduce_data_parallel=not use_ddp)
            grad_norm = float(clip_grad_norm_(parameters, options.grad_clip, pg))
            optimizer.step()  # pyright: ignore[reportUnknownMemberType]  # torch leaves `closure` unannotated
            loss_value = _replica_mean(loss, pg)
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
