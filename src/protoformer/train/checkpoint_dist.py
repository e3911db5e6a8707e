"""Tensor-parallel (sharded) checkpoints for a torchrun job.

Under torchrun every rank takes part in a save. Each tensor-parallel rank's weights and
optimizer state are its own shard of the model, so each is written by its data-parallel
replica 0 to its own file (`model.tp00-of-02.safetensors`, ...; with one tensor-parallel
rank the usual `model.safetensors`, so a data-parallel-only run writes a checkpoint that a
single process loads). Rank 0 writes state.json, which also keeps every rank's RNG states,
and publishes the directory atomically once all shards are written. Resuming needs the
same tensor-parallel size; nothing is gathered, so a save costs no communication beyond
barriers and one small gather of JSON. Under expert parallelism each (tensor-parallel,
expert-parallel) rank pair writes its own file (`model.ep01-of-02.safetensors`, ...): the
experts differ between EP ranks. The directory layout and the single-process
functions these fall back to are in `protoformer.train.checkpoint`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from protoformer.distributed import all_gather_objects, barrier
from protoformer.parallel.groups import ProcessGroups
from protoformer.train.checkpoint import load_checkpoint, save_checkpoint
from protoformer.train.checkpoint_files import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    STATE_FILE,
    TEMP_PREFIX,
    CheckpointError,
    JSONValue,
    copy_files,
    publish_step_directory,
    read_state,
    remove_stale_temps,
    saved_expert_parallel_size,
    saved_tensor_parallel_size,
    shard_file_names,
    step_directory_name,
    write_text,
)
from protoformer.train.checkpoint_state import load_shard, write_shard

__all__ = ["load_distributed_checkpoint", "save_distributed_checkpoint", "shard_file_names"]


def save_distributed_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None,
    state: Mapping[str, JSONValue],
    *,
    pg: ProcessGroups,
    rng_state: JSONValue,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """`save_checkpoint` for a torchrun job: call on every rank (it is collective).

    `state` is taken from rank 0; `rng_state` is this rank's, kept per rank under
    "rng_per_rank"; rank 0 copies `extra_files` in. Returns the step directory (on every
    rank) once it is published.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return save_checkpoint(run_dir, step, model, optimizer, {**state, "rng": rng_state},
                               extra_files=extra_files)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = step_directory_name(step)
    final = root / name
    temp = root / f"{TEMP_PREFIX}{name}-distributed"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        temp.mkdir()
    barrier()
    model_file, optimizer_file = shard_file_names(pg.tp_rank, pg.tp_size, pg.ep_rank,
                                                  pg.ep_size)
    written: dict[str, JSONValue] = {}
    optimizer_json: JSONValue = None
    # Data-parallel replicas hold the same shard; under expert parallelism the first
    # `ep` replicas (expert-DP rank 0) hold one EP rank's experts each.
    writes = pg.dp_rank < pg.ep_size
    if writes:
        written, optimizer_json = write_shard(temp, model, optimizer, model_file=model_file,
                                              optimizer_file=optimizer_file)
    mine: JSONValue = {"rank": rank, "tp_rank": pg.tp_rank, "dp_rank": pg.dp_rank,
                       "shard": _shard_key(pg), "writes": writes,
                       "files": written, "optimizer": optimizer_json, "rng": rng_state}
    everyone = all_gather_objects(mine)
    if rank == 0:
        files: dict[str, JSONValue] = {}
        optimizers: dict[str, JSONValue] = {}
        rngs: list[JSONValue] = []
        for entry in everyone:
            assert isinstance(entry, dict)
            written_files = entry["files"]
            assert isinstance(written_files, dict)
            files.update(written_files)
            if entry["writes"] and optimizer is not None:
                optimizers[str(entry["shard"])] = entry["optimizer"]
            rngs.append(entry["rng"])
        files.update(copy_files(temp, extra_files or {}))
        single = pg.tp_size == 1 and pg.ep_size == 1
        document: dict[str, JSONValue] = {
            **state, "format": FORMAT_VERSION, "step": step,
            "optimizer": optimizers.get("0") if single else None,
            "files": files, "rng": rngs[0], "rng_per_rank": rngs,
            "tensor_parallel": {"size": pg.tp_size, "world_size": world_size,
                                "optimizer": optimizers}}
        if pg.ep_size > 1:
            document["expert_parallel"] = {"size": pg.ep_size}
        write_text(temp / STATE_FILE, json.dumps(document, indent=1))
        publish_step_directory(temp, final)
    barrier()  # nobody reads or moves on before the checkpoint is published
    return final


def _shard_key(pg: ProcessGroups) -> str:
    """The key of a shard's optimizer record: "tp_rank" (and ".ep_rank" under EP)."""
    return str(pg.tp_rank) if pg.ep_size == 1 else f"{pg.tp_rank}.{pg.ep_rank}"


def load_distributed_checkpoint(
    step_dir: str | Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    pg: ProcessGroups,
) -> dict[str, JSONValue]:
    """Load this rank's shard of a checkpoint saved by `save_distributed_checkpoint`.

    The tensor-parallel size must be the one the checkpoint was saved with. As
    `load_checkpoint`, every file of this rank is checked before anything is touched.
    """
    directory = Path(step_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    document = read_state(directory)
    saved_tp = saved_tensor_parallel_size(document)
    if saved_tp != pg.tp_size:
        raise CheckpointError(
            f"{directory}: saved with tensor parallelism over {saved_tp} rank(s), but this run "
            f"uses --tp {pg.tp_size}; resume with --tp {saved_tp} (the shards are not "
            "re-split)")
    saved_ep = saved_expert_parallel_size(document)
    if saved_ep != pg.ep_size:
        raise CheckpointError(
            f"{directory}: saved with expert parallelism over {saved_ep} rank(s), but this run "
            f"uses --ep {pg.ep_size}; resume with --ep {saved_ep} (the experts are not "
            "re-split)")
    if pg.tp_size == 1 and pg.ep_size == 1:
        return load_checkpoint(directory, model, optimizer)
    model_file, optimizer_file = shard_file_names(pg.tp_rank, pg.tp_size, pg.ep_rank,
                                                  pg.ep_size)
    entry = document.get("tensor_parallel")
    saved = entry.get("optimizer") if isinstance(entry, dict) else None
    record = saved.get(_shard_key(pg)) if isinstance(saved, dict) else None
    load_shard(directory, document, model, optimizer, model_file=model_file,
               optimizer_file=optimizer_file, optimizer_record=record)
    return document
