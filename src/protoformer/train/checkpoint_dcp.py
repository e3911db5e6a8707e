"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its shards.

The format of FSDP2 runs (`--fsdp`). A step directory holds `dcp/` (DCP's `.metadata` and one
`.distcp` file per writing rank) and state.json (rank 0: the run's state, every rank's RNG
states, the layout). The model and optimizer states come from
`torch.distributed.checkpoint.state_dict.get_state_dict`: under FSDP2 they are DTensors, which
DCP stores by their global shape and offsets, so a run resumes on another number of
data-parallel ranks, or on one process (`load_sharded_checkpoint` on an unwrapped model).

Tensor parallelism is ours (plain per-rank tensors): each tensor-parallel rank's states are
kept under their own prefix (`tp00-of-02/...`), so resuming needs the same `--tp`; the data-
parallel (FSDP) size may change.

Atomic: the shards are written into a `.tmp-*` directory that rank 0 renames to the step
directory (and points `latest` at) only after every rank has finished writing; a save
killed midway leaves the previous checkpoint as `latest`, and the next save removes the
leftover.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer

from protoformer.distributed import all_gather_objects, barrier
from protoformer.parallel.groups import ProcessGroups
from protoformer.train.checkpoint_files import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    STATE_FILE,
    TEMP_PREFIX,
    CheckpointError,
    JSONValue,
    publish_step_directory,
    read_state,
    remove_stale_temps,
    step_directory_name,
    write_text,
)

__all__ = ["DCP_DIR", "is_sharded_checkpoint", "load_sharded_checkpoint",
           "save_sharded_checkpoint"]

DCP_DIR = "dcp"
LAYOUT_KIND = "dcp"

# torch leaves `checkpoint_id`'s PathLike unparameterised; the types they are called with here.
_dcp_save = cast("Callable[..., object]", state_dict_saver.save)  # pyright: ignore[reportUnknownMemberType]
_dcp_load = cast("Callable[..., None]", state_dict_loader.load)  # pyright: ignore[reportUnknownMemberType]


# The optimizer state flattened by parameter name (`state.<fqn>.exp_avg`,
# `param_groups.<fqn>.lr`): pipeline stages hold different parameters, so a per-rank
# `param_groups` list would be one key with a different value on each stage.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _prefix(pg: ProcessGroups) -> str:
    return f"tp{pg.tp_rank:02d}-of-{pg.tp_size:02d}"


def is_sharded_checkpoint(document: Mapping[str, JSONValue]) -> bool:
    """Whether a state.json describes a DCP checkpoint (this module's format)."""
    layout = document.get("layout")
    return isinstance(layout, dict) and layout.get("kind") == LAYOUT_KIND


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                            optimizer: Optimizer, state: Mapping[str, JSONValue], *,
                            pg: ProcessGroups, rng_state: JSONValue) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` with DCP; collective (call on every rank).

    `state` is taken from rank 0; `rng_state` is this rank's (kept per rank)."""
    rank = dist.get_rank()
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = step_directory_name(step)
    final = root / name
    temp = root / f"{TEMP_PREFIX}{name}-dcp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        temp.mkdir()
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_OPTIONS)
    _dcp_save({_prefix(pg): {"model": model_state, "optimizer": optimizer_state}},
             checkpoint_id=temp / DCP_DIR)
    rngs = all_gather_objects(rng_state)  # also: every rank has finished writing
    if rank == 0:
        document: dict[str, JSONValue] = {
            **state, "format": FORMAT_VERSION, "step": step, "optimizer": None, "files": {},
            "rng": rngs[0], "rng_per_rank": list(rngs),
            "layout": {"kind": LAYOUT_KIND, "tensor_parallel": pg.tp_size,
                       "data_parallel": pg.dp_size, "pipeline_parallel": pg.pp_size,
                       "world_size": dist.get_world_size()},
            "tensor_parallel": {"size": pg.tp_size}}
        write_text(temp / STATE_FILE, json.dumps(document, indent=1))
        publish_step_directory(temp, final)
    barrier()  # nobody reads or moves on before the checkpoint is published
    return final


def load_sharded_checkpoint(step_dir: str | Path, model: nn.Module,
                            optimizer: Optimizer | None, *,
                            pg: ProcessGroups) -> dict[str, JSONValue]:
    """Load a DCP checkpoint into `model` (FSDP2-sharded or not) and `optimizer`; returns its
    state.json. The tensor-parallel size must be the saved one; the data-parallel size may
    differ (DCP re-slices the shards)."""
    directory = Path(step_dir)
    document = read_state(directory)
    layout = document.get("layout")
    saved_tp = layout.get("tensor_parallel") if isinstance(layout, dict) else None
    if saved_tp != pg.tp_size:
        raise CheckpointError(
            f"{directory}: a sharded checkpoint saved with tensor parallelism over {saved_tp} "
            f"rank(s), but this run uses --tp {pg.tp_size}; resume with --tp {saved_tp}")
    optimizers = [] if optimizer is None else [optimizer]
    model_state, optimizer_state = get_state_dict(model, optimizers, options=_OPTIONS)
    wanted: dict[str, object] = {"model": model_state}
    if optimizer is not None:
        wanted["optimizer"] = optimizer_state
    _dcp_load({_prefix(pg): wanted}, checkpoint_id=directory / DCP_DIR,  # fills them in place
              no_dist=not dist.is_initialized())
    set_state_dict(model, optimizers, model_state_dict=model_state,
                   optim_state_dict=optimizer_state if optimizer is not None else {},
                   options=_OPTIONS)
    return document
