"""What a training run's checkpoints hold besides the weights, and resuming from them.

Next to weights and optimizer state a checkpoint records the options, the model's
description, the data sampler's position, the loss history and every rank's random-number
states (`run_state`, `rng_state`), so `resume_run` continues *exactly* where the run was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.optim import AdamW

from protoformer.config import TransformerConfig
from protoformer.distributed import LaunchEnvironment
from protoformer.parallel.groups import ProcessGroups
from protoformer.parallel.random import get_rng_tracker
from protoformer.train.checkpoint_dcp import is_sharded_checkpoint, load_sharded_checkpoint
from protoformer.train.checkpoint_dist import load_distributed_checkpoint
from protoformer.train.checkpoint_files import CheckpointError, JSONValue, read_state
from protoformer.train.checkpoint_state import bytes_from_json, bytes_to_json
from protoformer.train.data import BatchSampler
from protoformer.train.dataset import TrainingData
from protoformer.train.options import TrainOptions
from protoformer.train.run_model import RunModel

__all__ = ["check_same_corpus", "config_summary", "resume_run", "rng_state", "run_state"]


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


def run_state(built: RunModel, options: TrainOptions, sampler: BatchSampler,
              train_losses: list[tuple[int, float]],
              validation_losses: list[tuple[int, float]],
              data: TrainingData | None = None) -> dict[str, JSONValue]:
    """What a checkpoint of this run stores besides weights, optimizer state and RNG states.

    With `data`, its size and sha256 (which `check_same_corpus` compares on resume) and what
    tokenizer made its tokens."""
    model = built.model
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
    if data is not None:
        document["corpus"] = dict(data.record())
        document["tokenizer"] = dict(data.tokenizer.to_json())
    if built.hf_config is not None:  # `generate` and `--resume` rebuild the model from it
        document["hf_config"] = built.hf_config
    if built.layer_spec is not None:
        document["layer_spec"] = built.layer_spec
    return document


def check_same_corpus(saved: Mapping[str, JSONValue], corpus: TrainingData, where: Path) -> None:
    """Refuse to resume on other data than the checkpoint's run read (an exact continuation
    draws the same windows from the same bytes). Checkpoints without a record pass."""
    record = saved.get("corpus")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return
    if record["sha256"] != corpus.fingerprint:
        raise ValueError(
            f"cannot resume from {where}: the training data changed since it was saved "
            f"({record.get('source')}: {record.get('bytes')} bytes then, now {corpus.source}: "
            f"{corpus.text_bytes} bytes with different contents); restore the data, or start a "
            "new run with another --out")


def rng_state() -> dict[str, JSONValue]:
    """This process's random-number states (torch CPU and CUDA, the dropout streams) as JSON."""
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


def resume_run(checkpoint: Path, model: torch.nn.Module, optimizer: AdamW,
               sampler: BatchSampler, *,
               pg: ProcessGroups, launch: LaunchEnvironment,
               ) -> tuple[int, list[tuple[int, float]], list[tuple[int, float]]]:
    """Load everything a checkpoint holds into `model` (a `GPTModel`, or a pipeline rank's
    stages under the model's names); returns (step, train losses, validation losses)."""
    sharded = is_sharded_checkpoint(read_state(checkpoint))
    if sharded:
        state = load_sharded_checkpoint(checkpoint, model, optimizer, pg=pg)
    else:
        state = load_distributed_checkpoint(checkpoint, model, optimizer, pg=pg)
    _restore_rng(_rank_rng_state(state, launch, checkpoint, other_world=sharded))
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
                    checkpoint: Path, *, other_world: bool = False) -> JSONValue:
    """This rank's RNG states: saved per rank by a multi-process run, else the one entry.

    With `other_world` (a sharded checkpoint, which resumes on another layout) a run of
    another size takes rank 0's states (dropout masks then differ from the saved run's)."""
    per_rank = state.get("rng_per_rank")
    saved_world = len(per_rank) if isinstance(per_rank, list) else 1
    if saved_world != launch.world_size and other_world:
        return per_rank[0] if isinstance(per_rank, list) else state.get("rng")
    if saved_world != launch.world_size:
        raise CheckpointError(
            f"{checkpoint}: saved by a run of {saved_world} process(es), but this run has "
            f"{launch.world_size}; resume with the same launch (torchrun --nproc-per-node "
            f"{saved_world}), since every rank's random-number state is restored")
    if isinstance(per_rank, list):
        return per_rank[launch.rank]
    return state.get("rng")
