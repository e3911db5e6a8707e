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
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeAlias, cast

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file  # pyright: ignore[reportUnknownVariableType]  # os.PathLike left unparameterised upstream
from torch import Tensor, nn
from torch.optim import Optimizer

from protoformer.distributed import all_gather_objects, barrier
from protoformer.parallel.groups import ProcessGroups

__all__ = [
    "CHECKPOINTS_DIR",
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
    "load_distributed_checkpoint",
    "read_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_distributed_checkpoint",
    "shard_file_names",
    "step_directory_name",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_ALIASES_KEY = "protoformer.aliases"
_TEMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model it is loaded into."""


def step_directory_name(step: int) -> str:
    """`step_000100` for step 100."""
    return f"step_{step:06d}"


def bytes_to_json(data: Tensor | bytes) -> str:
    """A uint8 tensor (an RNG state) or bytes as base64 text for the JSON file."""
    raw = data if isinstance(data, bytes) else data.cpu().contiguous().numpy().tobytes()
    return base64.b64encode(raw).decode("ascii")


def bytes_from_json(text: JSONValue, *, what: str) -> Tensor:
    """The uint8 tensor saved by `bytes_to_json`; `CheckpointError` naming `what` otherwise."""
    if not isinstance(text, str):
        raise CheckpointError(f"{what}: expected base64 text, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError as error:
        raise CheckpointError(f"{what}: not valid base64 ({error})") from error
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()  # [n]


# --- writing ------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are synced
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _fsync_path(path)


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f"{_TEMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        _write_text(temp, text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def _storage_key(tensor: Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _unique_tensors(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors to write, each storage once, and {alias: name written} for tied weights.

    safetensors refuses tensors that share memory; a tied weight (the same tensor under two
    names) is written under its first name and recorded as an alias of it. Other views of a
    shared storage are copied.
    """
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = _storage_key(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        storage = key[0]
        if storage in storages or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        storages.add(storage)
        unique[name] = tensor.cpu()
    return unique, aliases


def _to_json(value: object, where: str) -> JSONValue:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in cast("tuple[object, ...]", value)]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in cast("list[object]", value)]
    if isinstance(value, dict):
        items = cast("dict[object, object]", value).items()
        return {str(k): _to_json(v, where) for k, v in items}
    raise CheckpointError(f"cannot save {where}: a value of type {type(value).__name__} is "
                          "neither a tensor nor JSON (None, bool, int, float, str, list, dict)")


def _from_json(value: JSONValue) -> object:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _flatten_optimizer(optimizer: Optimizer) -> tuple[dict[str, Tensor], JSONValue]:
    """Optimizer state as {"state.<param>.<key>": tensor} plus the rest as JSON."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    per_param: dict[str, JSONValue] = {}
    for param_id, param_state in state_dict["state"].items():
        values: dict[str, JSONValue] = {}
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                values[str(key)] = _to_json(value, f"optimizer state {param_id}.{key}")
        per_param[str(param_id)] = values
    groups = _to_json(state_dict["param_groups"], "optimizer param_groups")
    return tensors, {"state": per_param, "param_groups": groups}


def _file_record(path: Path) -> dict[str, JSONValue]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _remove_stale_temps(root: Path) -> None:
    for entry in root.glob(f"{_TEMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None,
    state: Mapping[str, JSONValue],
) -> Path:
    """Write `run_dir/checkpoints/step_<step>/` atomically and point `latest` at it.

    `state` is stored in state.json next to the step and the optimizer's non-tensor state
    (keys "step", "optimizer", "files" and "format" are reserved). Returns the step directory.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    name = step_directory_name(step)
    final = root / name
    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{name}-", dir=root))
    try:
        weights, aliases = _unique_tensors(model.state_dict())
        _write_safetensors(temp / MODEL_FILE, weights, {_ALIASES_KEY: json.dumps(aliases)})
        files: dict[str, JSONValue] = {MODEL_FILE: _file_record(temp / MODEL_FILE)}
        optimizer_json: JSONValue = None
        if optimizer is not None:
            optimizer_tensors, optimizer_json = _flatten_optimizer(optimizer)
            _write_safetensors(temp / OPTIMIZER_FILE, optimizer_tensors, {})
            files[OPTIMIZER_FILE] = _file_record(temp / OPTIMIZER_FILE)
        document: dict[str, JSONValue] = {
            **state, "format": FORMAT_VERSION, "step": step, "optimizer": optimizer_json,
            "files": files}
        _write_text(temp / STATE_FILE, json.dumps(document, indent=1))
        _fsync_path(temp)
        if final.exists():  # saving the same step again: swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}old-{name}-", dir=root))
            os.replace(final, old / name)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST_FILE, name + "\n")
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


def read_state(step_dir: str | Path) -> dict[str, JSONValue]:
    """The parsed state.json of a step directory."""
    path = Path(step_dir) / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from error
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from error
    try:
        document: JSONValue = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(document, dict) or not isinstance(document.get("step"), int):
        raise CheckpointError(f"{path}: expected a JSON object with an integer 'step'")
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {document.get('format')!r}, this version of "
                              f"protoformer reads format {FORMAT_VERSION}")
    return document


def _verify_file(path: Path, record: JSONValue) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    if not isinstance(record, dict):
        return  # nothing recorded: safetensors' own checks still apply
    size = path.stat().st_size
    if record.get("bytes") != size:
        raise CheckpointError(f"{path}: {size} bytes, but {record.get('bytes')} were written; "
                              "the file is truncated or was replaced")
    if record.get("sha256") != _file_record(path)["sha256"]:
        raise CheckpointError(f"{path}: contents differ from what was written (sha256 "
                              "mismatch); the file is corrupt")


class _SafetensorsFile(Protocol):
    """What `safe_open` yields (safetensors ships it untyped)."""

    def metadata(self) -> dict[str, str] | None: ...

    def keys(self) -> list[str]: ...

    def get_tensor(self, name: str) -> Tensor: ...


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        opened = cast("AbstractContextManager[_SafetensorsFile]",
                      safe_open(str(path), framework="pt", device="cpu"))
        with opened as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from error
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, metadata


def _listing(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _model_tensors(path: Path, model: nn.Module) -> dict[str, Tensor]:
    tensors, metadata = _read_safetensors(path)
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: metadata '{_ALIASES_KEY}' is not valid JSON") from error
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{path}: metadata '{_ALIASES_KEY}' is not a JSON object")
    for alias, name in aliases.items():  # pyright: ignore[reportUnknownVariableType]  # parsed JSON
        if not isinstance(alias, str) or not isinstance(name, str) or name not in tensors:
            raise CheckpointError(f"{path}: tied weight {alias!r} refers to {name!r}, which the "
                                  "file does not hold")
        tensors[alias] = tensors[name]
    expected = model.state_dict()
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    problems: list[str] = []
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listing(unexpected)}")
    for name in sorted(set(expected) & set(tensors)):
        if tuple(tensors[name].shape) != tuple(expected[name].shape):
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, the model expects "
                            f"{tuple(expected[name].shape)}")
    if problems:
        raise CheckpointError(f"{path}: does not match the model: " + "; ".join(problems)
                              + " (was it saved from a different preset or config?)")
    return tensors


def _optimizer_state(path: Path, record: JSONValue, optimizer: Optimizer) -> dict[str, object]:
    if not isinstance(record, dict):
        raise CheckpointError(f"{path.parent / STATE_FILE}: has no optimizer state to resume from")
    tensors, _ = _read_safetensors(path)
    per_param = record.get("state")
    groups = _from_json(record.get("param_groups"))
    if not isinstance(per_param, dict) or not isinstance(groups, list):
        raise CheckpointError(f"{path.parent / STATE_FILE}: optimizer entry lacks 'state' or "
                              "'param_groups'")
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, object]] = {}
    for key, values in per_param.items():
        if not key.isdigit() or int(key) >= len(parameters) or not isinstance(values, dict):
            raise CheckpointError(f"{path.parent / STATE_FILE}: optimizer state for parameter "
                                  f"{key!r} does not fit an optimizer of {len(parameters)} "
                                  "parameters")
        state[int(key)] = {k: _from_json(v) for k, v in values.items()}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() \
                or int(parts[1]) not in state:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        param = parameters[int(parts[1])]
        if tensor.dim() > 0 and tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, but "
                                  f"parameter {parts[1]} has shape {tuple(param.shape)}")
        state[int(parts[1])][parts[2]] = tensor
    return {"state": state, "param_groups": groups}


def load_checkpoint(
    step_dir: str | Path,
    model: nn.Module,
    optimizer: Optimizer | None = None,
) -> dict[str, JSONValue]:
    """Load weights (and optimizer state) from a step directory; return its state.json.

    Every file is read and checked (size, checksum, tensor names and shapes) before the model
    or optimizer is touched, so a bad checkpoint raises `CheckpointError` naming the file and
    the problem and leaves both unchanged.
    """
    directory = Path(step_dir)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    document = read_state(directory)
    saved_tp = _tensor_parallel_size(document)
    if saved_tp > 1:
        raise CheckpointError(
            f"{directory}: saved with tensor parallelism over {saved_tp} ranks (one weight file "
            f"per rank); load it in a run with the same split: torchrun --nproc-per-node "
            f"{saved_tp} ... --tp {saved_tp}")
    files = document.get("files")
    records: dict[str, JSONValue] = files if isinstance(files, dict) else {}
    _verify_file(directory / MODEL_FILE, records.get(MODEL_FILE))
    weights = _model_tensors(directory / MODEL_FILE, model)
    optimizer_state: dict[str, object] | None = None
    if optimizer is not None:
        _verify_file(directory / OPTIMIZER_FILE, records.get(OPTIMIZER_FILE))
        optimizer_state = _optimizer_state(directory / OPTIMIZER_FILE, document.get("optimizer"),
                                           optimizer)
    model.load_state_dict(weights, strict=True)
    if optimizer is not None and optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{directory / OPTIMIZER_FILE}: does not fit the optimizer "
                                  f"({error})") from error
    return document


# --- tensor-parallel (sharded) checkpoints ------------------------------------------------
#
# Under torchrun every rank takes part in a save. Each tensor-parallel rank's weights and
# optimizer state are its own shard of the model, so each is written by its data-parallel
# replica 0 to its own file (`model.tp00-of-02.safetensors`, ...; with one tensor-parallel
# rank the usual `model.safetensors`, so a data-parallel-only run writes a checkpoint that a
# single process loads). Rank 0 writes state.json, which also keeps every rank's RNG states,
# and publishes the directory atomically once all shards are written. Resuming needs the
# same tensor-parallel size; nothing is gathered, so a save costs no communication beyond
# barriers and one small gather of JSON.


def shard_file_names(tp_rank: int, tp_size: int) -> tuple[str, str]:
    """The model and optimizer file names of tensor-parallel rank `tp_rank` of `tp_size`."""
    if tp_size == 1:
        return MODEL_FILE, OPTIMIZER_FILE
    suffix = f".tp{tp_rank:02d}-of-{tp_size:02d}"
    return f"model{suffix}.safetensors", f"optimizer{suffix}.safetensors"


def _tensor_parallel_size(document: Mapping[str, JSONValue]) -> int:
    entry = document.get("tensor_parallel")
    size = entry.get("size") if isinstance(entry, dict) else None
    return size if isinstance(size, int) and size >= 1 else 1


def save_distributed_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None,
    state: Mapping[str, JSONValue],
    *,
    pg: ProcessGroups,
    rng_state: JSONValue,
) -> Path:
    """`save_checkpoint` for a torchrun job: call on every rank (it is collective).

    `state` is taken from rank 0; `rng_state` is this rank's, kept per rank under
    "rng_per_rank". Returns the step directory (on every rank) once it is published.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return save_checkpoint(run_dir, step, model, optimizer, {**state, "rng": rng_state})
    rank, world_size = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = step_directory_name(step)
    final = root / name
    temp = root / f"{_TEMP_PREFIX}{name}-distributed"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        temp.mkdir()
    barrier()
    model_file, optimizer_file = shard_file_names(pg.tp_rank, pg.tp_size)
    written: dict[str, JSONValue] = {}
    optimizer_json: JSONValue = None
    if pg.dp_rank == 0:  # data-parallel replicas hold the same shard
        weights, aliases = _unique_tensors(model.state_dict())
        _write_safetensors(temp / model_file, weights, {_ALIASES_KEY: json.dumps(aliases)})
        written[model_file] = _file_record(temp / model_file)
        if optimizer is not None:
            optimizer_tensors, optimizer_json = _flatten_optimizer(optimizer)
            _write_safetensors(temp / optimizer_file, optimizer_tensors, {})
            written[optimizer_file] = _file_record(temp / optimizer_file)
    mine: JSONValue = {"rank": rank, "tp_rank": pg.tp_rank, "dp_rank": pg.dp_rank,
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
            if entry["dp_rank"] == 0 and optimizer is not None:
                optimizers[str(entry["tp_rank"])] = entry["optimizer"]
            rngs.append(entry["rng"])
        document: dict[str, JSONValue] = {
            **state, "format": FORMAT_VERSION, "step": step,
            "optimizer": optimizers.get("0") if pg.tp_size == 1 else None,
            "files": files, "rng": rngs[0], "rng_per_rank": rngs,
            "tensor_parallel": {"size": pg.tp_size, "world_size": world_size,
                                "optimizer": optimizers}}
        _write_text(temp / STATE_FILE, json.dumps(document, indent=1))
        _fsync_path(temp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}old-{name}-", dir=root))
            os.replace(final, old / name)
            os.replace(temp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_path(root)
        _write_text_atomic(root / LATEST_FILE, name + "\n")
    barrier()  # nobody reads or moves on before the checkpoint is published
    return final


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
    saved_tp = _tensor_parallel_size(document)
    if saved_tp != pg.tp_size:
        raise CheckpointError(
            f"{directory}: saved with tensor parallelism over {saved_tp} rank(s), but this run "
            f"uses --tp {pg.tp_size}; resume with --tp {saved_tp} (the shards are not "
            "re-split)")
    if pg.tp_size == 1:
        return load_checkpoint(directory, model, optimizer)
    model_file, optimizer_file = shard_file_names(pg.tp_rank, pg.tp_size)
    files = document.get("files")
    records: dict[str, JSONValue] = files if isinstance(files, dict) else {}
    _verify_file(directory / model_file, records.get(model_file))
    weights = _model_tensors(directory / model_file, model)
    optimizer_state: dict[str, object] | None = None
    if optimizer is not None:
        _verify_file(directory / optimizer_file, records.get(optimizer_file))
        entry = document.get("tensor_parallel")
        saved = entry.get("optimizer") if isinstance(entry, dict) else None
        record = saved.get(str(pg.tp_rank)) if isinstance(saved, dict) else None
        optimizer_state = _optimizer_state(directory / optimizer_file, record, optimizer)
    model.load_state_dict(weights, strict=True)
    if optimizer is not None and optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{directory / optimizer_file}: does not fit the optimizer "
                                  f"({error})") from error
    return document
