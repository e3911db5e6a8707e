"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its shards.

Megatron-Core's `torch_dist` format (`--ckpt-format torch_dist`, the default with `--fsdp`).
A step directory holds `dcp/` (DCP's `.metadata` and one `.distcp` file per writing rank),
the run's tokenizer, and state.json (rank 0: the run's state and data position, every rank's
RNG states, the layout it was saved on).

Every parameter and optimizer state is stored as the *global* (single-process) tensor: each
rank writes its pieces at their offsets (`protoformer.train.checkpoint_layout`: our tensor
parallelism, its fused layouts, FSDP2's dim-0 shards, expert parallelism's blocks of experts),
so a run **resumes on another layout** (another `--tp` or `--ep`, with or without `--fsdp`,
another number of data-parallel ranks, one process): DCP reads each rank's new pieces from whichever saved chunks overlap them. What
does not carry over to another world size: the per-rank RNG states (each rank of the new run
takes saved rank 0's, so dropout masks differ from an uninterrupted run's).

Atomic: the shards are written into a `.tmp-*` directory that rank 0 renames to the step
directory (and points `latest` at) only after every rank has finished writing; a save killed
midway leaves the previous checkpoint as `latest`, and the next save removes the leftover.
An asynchronous save (`dcp.async_save`, `--async-save`) copies the states to CPU memory and
writes them in a background thread; it is published when the next save starts or the run
ends (`PendingSave.finish`), by the same rule.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import cast

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint import state_dict_loader, state_dict_saver
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer

from protoformer.distributed import all_gather_objects, barrier
from protoformer.parallel.groups import ProcessGroup, ProcessGroups
from protoformer.parallel.parameters import ParallelMetadata, parallel_metadata
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
    step_directory_name,
    write_text,
)
from protoformer.train.checkpoint_layout import (
    GlobalPieces,
    PiecesLoadPlanner,
    PiecesSavePlanner,
    expert_global_name,
    global_value,
    owner_config,
)

__all__ = ["DCP_DIR", "PendingSave", "is_sharded_checkpoint", "layout_change_note",
           "load_sharded_checkpoint", "save_sharded_checkpoint", "start_sharded_checkpoint"]

DCP_DIR = "dcp"
LAYOUT_KIND = "dcp"

# torch leaves `checkpoint_id`'s PathLike unparameterised; the types they are called with here.
_dcp_save = cast("Callable[..., object]", state_dict_saver.save)  # pyright: ignore[reportUnknownMemberType]
_dcp_async_save = cast("Callable[..., object]", state_dict_saver.async_save)  # pyright: ignore[reportUnknownMemberType]
_dcp_load = cast("Callable[..., None]", state_dict_loader.load)  # pyright: ignore[reportUnknownMemberType]

_State = dict[str, object]


@contextlib.contextmanager
def _quiet_single_process() -> Generator[None, None, None]:
    """Silence DCP's warning that, without a process group, it saves or loads in one process
    (what a single-process run or `load_checkpoint` means to do)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                category=UserWarning)
        yield


def is_sharded_checkpoint(document: Mapping[str, JSONValue]) -> bool:
    """Whether a state.json describes a DCP checkpoint (this module's format)."""
    layout = document.get("layout")
    return isinstance(layout, dict) and layout.get("kind") == LAYOUT_KIND


def _records(model: nn.Module) -> dict[str, ParallelMetadata]:
    # remove_duplicate=False: a tied output layer keeps its own name (and the embedding's split).
    return {name: parallel_metadata(param)
            for name, param in model.named_parameters(remove_duplicate=False)}


def _global_states(model: nn.Module, model_state: Mapping[str, object],
                   optimizer_state: Mapping[str, object] | None, pg: ProcessGroups) -> _State:
    """{"model": ..., "optimizer": {"state": ...}} with every tensor as its global pieces,
    under the single-process names (an expert's own MLP renumbered under expert parallelism)."""
    records = _records(model)
    renamed: dict[str, str] = {}
    if pg.ep_size > 1:
        for name in records:
            if records[name].expert_parallel:
                global_name = expert_global_name(model, name, pg.ep_rank)
                if global_name is not None:
                    renamed[name] = global_name

    def convert(name: str, value: object) -> object:
        if not isinstance(value, Tensor):
            return value
        return global_value(name, value, records.get(name, ParallelMetadata()),
                            owner_config(model, name), pg.tp_rank, pg.tp_size, pg.ep_rank,
                            1 if name in renamed else pg.ep_size)

    states: _State = {"model": {renamed.get(name, name): convert(name, value)
                                for name, value in model_state.items()}}
    if optimizer_state is not None:
        per_param = cast("Mapping[str, Mapping[str, object]]", optimizer_state.get("state", {}))
        states["optimizer"] = {"state": {
            renamed.get(name, name): {key: convert(name, value) for key, value in entries.items()}
            for name, entries in per_param.items()}}
    return states


class _CPUStager:
    """Copies the states to CPU memory before an asynchronous save returns (DCP's `AsyncStager`
    protocol), so training may change the parameters while the copy is written."""

    should_synchronize_after_execute = False

    def stage(self, state_dict: dict[str, object]) -> dict[str, object]:
        return cast("dict[str, object]", _copy_to_cpu(state_dict))

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _copy_to_cpu(value: object) -> object:
    if isinstance(value, GlobalPieces):
        return GlobalPieces(value.global_size, [(offsets, piece.detach().to("cpu", copy=True))
                                                for offsets, piece in value.pieces])
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        items = cast("dict[str, object]", value).items()
        return {key: _copy_to_cpu(entry) for key, entry in items}
    return value


_async_groups: dict[str, ProcessGroup] = {}


def _async_group() -> ProcessGroup | None:
    """A gloo group of the world for the background writes (CPU collectives, and never
    interleaved with the training's own collectives); created once, on every rank."""
    if not dist.is_initialized():
        return None
    if "gloo" not in _async_groups:
        group = dist.new_group(backend="gloo")  # pyright: ignore[reportUnknownMemberType]  # torch leaves parameters unannotated
        assert isinstance(group, ProcessGroup)
        _async_groups["gloo"] = group
    return _async_groups["gloo"]


class PendingSave:
    """A save whose shards are being written; `finish` waits for them and publishes the step."""

    def __init__(self, temp: Path, final: Path, document: dict[str, JSONValue] | None,
                 upload: Future[object] | None) -> None:
        self._temp, self._final = temp, final
        self._document = document
        self._upload = upload

    @property
    def step_directory(self) -> Path:
        return self._final

    def finish(self) -> Path:
        """Wait for this rank's writes, then (rank 0, once every rank is done) write state.json
        and publish the step directory; collective. Returns the step directory."""
        if self._upload is not None:
            self._upload.result()  # raises what the background write raised
            self._upload = None
        barrier()  # every rank's shards are on disk
        if self._document is not None:
            write_text(self._temp / STATE_FILE, json.dumps(self._document, indent=1))
            publish_step_directory(self._temp, self._final)
            self._document = None
        barrier()  # nobody reads or moves on before the checkpoint is published
        return self._final


def start_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                             optimizer: Optimizer, state: Mapping[str, JSONValue], *,
                             pg: ProcessGroups, rng_state: JSONValue,
                             extra_files: Mapping[str, Path] | None = None,
                             asynchronous: bool = False) -> PendingSave:
    """Start writing `run_dir/checkpoints/step_<step>/` with DCP; collective (every rank).

    `state` is taken from rank 0; `rng_state` is this rank's (kept per rank); rank 0 copies
    `extra_files` (name -> source, e.g. the tokenizer) in. Synchronous unless `asynchronous`;
    the step is published by the returned `PendingSave.finish()`."""
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = step_directory_name(step)
    temp = root / f"{TEMP_PREFIX}{name}-dcp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        temp.mkdir()
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # Only the per-parameter optimizer states: the hyperparameters (param_groups) come from the
    # resuming run's options, and differ per pipeline stage (one DCP key would collide).
    states = _global_states(model, model_state, cast("Mapping[str, object]", optimizer_state),
                            pg)
    upload: Future[object] | None = None
    if asynchronous:
        if not distributed:  # the warning comes from the writing thread: filtered for good
            warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                    category=UserWarning)
        response = _dcp_async_save(states, checkpoint_id=temp / DCP_DIR,
                                   planner=PiecesSavePlanner(), async_stager=_CPUStager(),
                                   process_group=_async_group(), no_dist=not distributed)
        future = getattr(response, "upload_completion", response)  # AsyncSaveResponse or Future
        assert isinstance(future, Future)
        upload = cast("Future[object]", future)
    else:
        with _quiet_single_process():
            _dcp_save(states, checkpoint_id=temp / DCP_DIR, planner=PiecesSavePlanner(),
                      no_dist=not distributed)
    rngs = all_gather_objects(rng_state)
    document: dict[str, JSONValue] | None = None
    if rank == 0:
        files = copy_files(temp, extra_files or {})
        document = {
            **state, "format": FORMAT_VERSION, "step": step, "optimizer": None, "files": files,
            "rng": rngs[0], "rng_per_rank": list(rngs),
            "layout": {"kind": LAYOUT_KIND, "global": True, "tensor_parallel": pg.tp_size,
                       "data_parallel": pg.dp_size, "pipeline_parallel": pg.pp_size,
                       "expert_parallel": pg.ep_size, "world_size": world_size},
            "tensor_parallel": {"size": pg.tp_size}}
    return PendingSave(temp, root / name, document, upload)


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                            optimizer: Optimizer, state: Mapping[str, JSONValue], *,
                            pg: ProcessGroups, rng_state: JSONValue,
                            extra_files: Mapping[str, Path] | None = None) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` with DCP and publish it; collective."""
    return start_sharded_checkpoint(run_dir, step, model, optimizer, state, pg=pg,
                                    rng_state=rng_state, extra_files=extra_files).finish()


def load_sharded_checkpoint(step_dir: str | Path, model: nn.Module,
                            optimizer: Optimizer | None, *,
                            pg: ProcessGroups) -> dict[str, JSONValue]:
    """Load a DCP checkpoint into `model` (split over `pg.tp`, FSDP2-sharded or not, or whole)
    and `optimizer`, whatever layout saved it; returns its state.json."""
    directory = Path(step_dir)
    document = read_state(directory)
    layout = document.get("layout")
    if not (isinstance(layout, dict) and layout.get("global") is True):
        return _load_per_tensor_parallel_rank(directory, document, model, optimizer, pg=pg)
    optimizers = [] if optimizer is None else [optimizer]
    model_state, optimizer_state = get_state_dict(model, optimizers)
    wanted = _global_states(model, model_state, optimizer_state if optimizer else None, pg)
    try:
        with _quiet_single_process():
            _dcp_load(wanted, checkpoint_id=directory / DCP_DIR, planner=PiecesLoadPlanner(),
                      no_dist=not dist.is_initialized())  # fills the states in place
    except (RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise CheckpointError(f"{directory}: cannot load the sharded checkpoint into this model "
                              f"({first[:300]}); was it saved from a different model?"
                              ) from error
    set_state_dict(model, optimizers, model_state_dict=model_state,
                   optim_state_dict=optimizer_state if optimizer is not None else {})
    return document


def _load_per_tensor_parallel_rank(directory: Path, document: Mapping[str, JSONValue],
                                   model: nn.Module, optimizer: Optimizer | None, *,
                                   pg: ProcessGroups) -> dict[str, JSONValue]:
    """The first DCP format (each tensor-parallel rank's states under `tpRR-of-TT/`): resumes
    only with the same `--tp`."""
    layout = document.get("layout")
    saved_tp = layout.get("tensor_parallel") if isinstance(layout, dict) else None
    if saved_tp != pg.tp_size:
        raise CheckpointError(
            f"{directory}: a sharded checkpoint of the first format, saved with tensor "
            f"parallelism over {saved_tp} rank(s), but this run uses --tp {pg.tp_size}; "
            f"resume with --tp {saved_tp}")
    optimizers = [] if optimizer is None else [optimizer]
    # Saved by the first pipeline-parallel version: the optimizer state flattened per name.
    options = StateDictOptions(flatten_optimizer_state_dict=isinstance(layout, dict)
                               and "pipeline_parallel" in layout)
    model_state, optimizer_state = get_state_dict(model, optimizers, options=options)
    wanted: dict[str, object] = {"model": model_state}
    if optimizer is not None:
        wanted["optimizer"] = optimizer_state
    prefix = f"tp{pg.tp_rank:02d}-of-{pg.tp_size:02d}"
    with _quiet_single_process():
        _dcp_load({prefix: wanted}, checkpoint_id=directory / DCP_DIR,
                  no_dist=not dist.is_initialized())
    set_state_dict(model, optimizers, model_state_dict=model_state,
                   optim_state_dict=optimizer_state if optimizer is not None else {},
                   options=options)
    return dict(document)


def layout_change_note(document: Mapping[str, JSONValue], pg: ProcessGroups,
                       world_size: int) -> str | None:
    """One line saying what does not carry over when a sharded checkpoint is resumed on
    another layout (None on the same one)."""
    layout = document.get("layout")
    if not isinstance(layout, dict):
        return None
    saved = (layout.get("tensor_parallel"), layout.get("data_parallel"),
             layout.get("pipeline_parallel", 1), layout.get("world_size"),
             layout.get("expert_parallel", 1))
    if saved == (pg.tp_size, pg.dp_size, pg.pp_size, world_size, pg.ep_size):
        return None
    experts = (f" (ep={saved[4]})", f" (ep={pg.ep_size})") if saved[4] != pg.ep_size else ("", "")
    note = (f"note: resumed on another layout (saved at tp={saved[0]} x dp={saved[1]}"
            f"{experts[0]} x pp={saved[2]}, {saved[3]} process(es); now tp={pg.tp_size} x "
            f"dp={pg.dp_size}{experts[1]} x pp={pg.pp_size}, {world_size}): weights, optimizer "
            "state and data position carry over")
    if saved[3] != world_size:
        note += ("; the per-rank random-number states do not (every rank starts from saved "
                 "rank 0's, so dropout masks differ from the saved run's)")
    return note
