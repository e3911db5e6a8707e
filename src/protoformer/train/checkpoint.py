"""Checkpoints: safetensors weights and optimizer state, plus a JSON of everything else.

Layout of a run directory::

    OUT/checkpoints/step_000100/model.safetensors      model weights (tied weights stored once)
    OUT/checkpoints/step_000100/optimizer.safetensors  optimizer state tensors, flattened
    OUT/checkpoints/step_000100/state.json             step, non-tensor optimizer state, RNG
                                                       states, data position, model description
    OUT/checkpoints/latest                             the name of the newest step directory

Every write is atomic: a checkpoint is assembled in a temporary directory next to its final
place, each file is fsynced, and one `os.replace` publishes it; `latest` is replaced the
same way afterwards. A process killed at any point leaves the previous checkpoint and its
`latest` pointer intact (at worst a stray `.tmp-*` directory, removed by the next save).

This module saves, finds and loads the checkpoints of one process. The files themselves are
`checkpoint_files` (names, durable writes, checked reads) and `checkpoint_state` (what they
hold); a torchrun job's sharded checkpoints are `checkpoint_dist`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from torch import nn
from torch.optim import Optimizer

from protoformer.parallel.groups import ProcessGroups
from protoformer.train.checkpoint_dcp import is_sharded_checkpoint, load_sharded_checkpoint
from protoformer.train.checkpoint_files import (
    CHECKPOINTS_DIR,
    FORMAT_VERSION,
    LATEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
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
    step_directory_name,
    swapped_out_copy,
)

# Looked up here at each save, so that a test can make writing state.json fail.
from protoformer.train.checkpoint_files import write_text as _write_text
from protoformer.train.checkpoint_merge import load_merged_weights
from protoformer.train.checkpoint_state import (
    bytes_from_json,
    bytes_to_json,
    load_shard,
    write_shard,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "FORMAT_VERSION",
    "LATEST_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "CheckpointError",
    "JSONValue",
    "bytes_from_json",
    "bytes_to_json",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_directory_name",
]


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None,
    state: Mapping[str, JSONValue],
    *,
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` atomically and point `latest` at it.

    `state` is stored in state.json next to the step and the optimizer's non-tensor state
    (keys "step", "optimizer", "files" and "format" are reserved). `extra_files` (name ->
    source file) are copied in and checksummed with the rest. Returns the step directory.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(root)
    name = step_directory_name(step)
    final = root / name
    temp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-", dir=root))
    try:
        files, optimizer_json = write_shard(temp, model, optimizer, model_file=MODEL_FILE,
                                            optimizer_file=OPTIMIZER_FILE)
        files.update(copy_files(temp, extra_files or {}))
        document: dict[str, JSONValue] = {
            **state, "format": FORMAT_VERSION, "step": step, "optimizer": optimizer_json,
            "files": files}
        _write_text(temp / STATE_FILE, json.dumps(document, indent=1))
        publish_step_directory(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return final


# --- finding and reading ------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The step directory `run_dir/checkpoints/latest` names, or None when there is none."""
    pointer = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    return _follow_pointer(pointer)


def _follow_pointer(pointer: Path) -> Path:
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{pointer}: cannot read the latest-checkpoint pointer ({error})"
                              ) from error
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{pointer}: holds {name!r}, not a step directory name")
    target = pointer.parent / name
    if not target.is_dir():
        # A re-save of that step killed mid-swap leaves the published copy aside.
        aside = swapped_out_copy(pointer.parent, name)
        if aside is not None:
            return aside
        raise CheckpointError(f"{pointer} points to {name!r}, but {target} does not exist")
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory meant by `path`: a step directory, a checkpoints dir or a run dir."""
    given = Path(path)
    if not given.exists():
        raise CheckpointError(f"checkpoint {str(given)!r} does not exist")
    if not given.is_dir():
        raise CheckpointError(f"checkpoint {str(given)!r} is a file; pass the run directory or "
                              "a step directory (one holding state.json)")
    if (given / STATE_FILE).exists():
        return given
    for pointer in (given / LATEST_FILE, given / CHECKPOINTS_DIR / LATEST_FILE):
        if pointer.is_file():
            return _follow_pointer(pointer)
    raise CheckpointError(
        f"{given} holds no checkpoint: expected a step directory with {STATE_FILE}, or a run "
        f"directory with {CHECKPOINTS_DIR}/{LATEST_FILE}")


def load_checkpoint(
    step_dir: str | Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    verify: bool = True,
) -> dict[str, JSONValue]:
    """Load weights (and optimizer state) from a step directory; return its state.json.

    Every file is read and checked (size, checksum, tensor names and shapes) before the model
    or optimizer is touched, so a bad checkpoint raises `CheckpointError` naming the file and
    the problem and leaves both unchanged. A checkpoint saved with tensor parallelism loads
    its weights into this single-process model by merging the shards
    (`protoformer.train.checkpoint_merge`); its optimizer state needs the same split. A
    sharded (torch_dist / DCP) checkpoint loads whole whatever layout saved it (weights and
    optimizer state).
    A file that state.json records no checksum for is refused unless `verify=False`, which
    skips the size and checksum comparison (the user asked to load an unverified copy).
    """
    directory = Path(step_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    document = read_state(directory)
    if is_sharded_checkpoint(document):  # torch_dist: DCP re-slices it for one process
        return load_sharded_checkpoint(directory, model, optimizer, pg=ProcessGroups())
    saved_tp = saved_tensor_parallel_size(document)
    saved_ep = saved_expert_parallel_size(document)
    if saved_tp > 1 or saved_ep > 1:
        if optimizer is not None:
            splits = [(name, flag, size) for name, flag, size in (
                ("tensor", "tp", saved_tp), ("expert", "ep", saved_ep)) if size > 1]
            what = " and ".join(name for name, _, _ in splits)
            flags = " ".join(f"--{flag} {size}" for _, flag, size in splits)
            raise CheckpointError(
                f"{directory}: saved with {what} parallelism over {saved_tp * saved_ep} ranks "
                f"(one weight and optimizer file per rank); resume it in a run with the same "
                f"split: torchrun --nproc-per-node {saved_tp * saved_ep} ... {flags}")
        load_merged_weights(directory, document, model, saved_tp, saved_ep, verify=verify)
        return document
    load_shard(directory, document, model, optimizer, model_file=MODEL_FILE,
               optimizer_file=OPTIMIZER_FILE, optimizer_record=document.get("optimizer"),
               verify=verify)
    return document
