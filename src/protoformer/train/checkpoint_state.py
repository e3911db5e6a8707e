"""What a checkpoint's files hold: model and optimizer state as tensors plus JSON.

Model weights are written once per storage (a tied weight is stored under its first name and
recorded as an alias); optimizer state is flattened into tensors named
`state.<param>.<key>` and a JSON record of everything else. Loading checks every name and
shape against the model and optimizer before either is touched. `write_shard` and
`load_shard` do this for one model (one tensor-parallel rank's shard): the single-process and
the sharded checkpoints are built on them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from protoformer.jsonio import JSONFileError, loads_bounded
from protoformer.train.checkpoint_files import (
    STATE_FILE,
    CheckpointError,
    JSONValue,
    file_record,
    read_safetensors,
    verify_file,
    write_safetensors,
)

__all__ = ["bytes_from_json", "bytes_to_json", "check_model_tensors", "load_shard", "read_model_file",
           "write_shard"]

_ALIASES_KEY = "protoformer.aliases"


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


def write_shard(directory: Path, model: nn.Module, optimizer: Optimizer | None, *,
                model_file: str, optimizer_file: str) -> tuple[dict[str, JSONValue], JSONValue]:
    """Write `model`'s weights (and `optimizer`'s tensors) into `directory`.

    Returns the file records for state.json's "files" and the optimizer's non-tensor state
    (None without an optimizer).
    """
    weights, aliases = _unique_tensors(model.state_dict())
    write_safetensors(directory / model_file, weights, {_ALIASES_KEY: json.dumps(aliases)})
    files: dict[str, JSONValue] = {model_file: file_record(directory / model_file)}
    optimizer_json: JSONValue = None
    if optimizer is not None:
        optimizer_tensors, optimizer_json = _flatten_optimizer(optimizer)
        write_safetensors(directory / optimizer_file, optimizer_tensors, {})
        files[optimizer_file] = file_record(directory / optimizer_file)
    return files, optimizer_json


# --- reading ------------------------------------------------------------------------------


def _listing(names: set[str], limit: int = 5) -> str:
    shown = sorted(names)[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def read_model_file(path: Path) -> dict[str, Tensor]:
    """The tensors of a model file, tied weights (stored once) under each of their names."""
    tensors, metadata = read_safetensors(path)
    try:
        aliases = loads_bounded(metadata.get(_ALIASES_KEY, "{}"), source=f"{path}: metadata")
    except JSONFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{path}: metadata '{_ALIASES_KEY}' is not a JSON object")
    for alias, name in aliases.items():  # pyright: ignore[reportUnknownVariableType]  # parsed JSON
        if not isinstance(alias, str) or not isinstance(name, str) or name not in tensors:
            raise CheckpointError(f"{path}: tied weight {alias!r} refers to {name!r}, which the "
                                  "file does not hold")
        tensors[alias] = tensors[name]
    return tensors


def check_model_tensors(path: Path, tensors: Mapping[str, Tensor], model: nn.Module) -> None:
    """A `CheckpointError` naming missing, unexpected and misshapen tensors of `model`."""
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


def _model_tensors(path: Path, model: nn.Module) -> dict[str, Tensor]:
    tensors = read_model_file(path)
    check_model_tensors(path, tensors, model)
    return tensors


def _optimizer_state(path: Path, record: JSONValue, optimizer: Optimizer) -> dict[str, object]:
    if not isinstance(record, dict):
        raise CheckpointError(f"{path.parent / STATE_FILE}: has no optimizer state to resume from")
    tensors, _ = read_safetensors(path)
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


def load_shard(directory: Path, document: Mapping[str, JSONValue], model: nn.Module,
               optimizer: Optimizer | None, *, model_file: str, optimizer_file: str,
               optimizer_record: JSONValue, verify: bool = True) -> None:
    """Load `model_file` (and `optimizer_file`, whose non-tensor state is `optimizer_record`).

    Both files are checked against the records in `document` (state.json) before the model or
    optimizer is touched; `verify=False` skips the size and checksum comparison.
    """
    files = document.get("files")
    records: dict[str, JSONValue] = files if isinstance(files, dict) else {}
    verify_file(directory / model_file, records.get(model_file), verify=verify)
    weights = _model_tensors(directory / model_file, model)
    optimizer_state: dict[str, object] | None = None
    if optimizer is not None:
        verify_file(directory / optimizer_file, records.get(optimizer_file), verify=verify)
        optimizer_state = _optimizer_state(directory / optimizer_file, optimizer_record, optimizer)
    if optimizer is not None and optimizer_state is not None:
        # First: torch checks the parameter groups only here, and a refusal must leave the
        # model untouched too.
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{directory / optimizer_file}: does not fit the optimizer "
                                  f"({error})") from error
    model.load_state_dict(weights, strict=True)
