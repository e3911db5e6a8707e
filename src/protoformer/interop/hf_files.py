"""Hugging Face checkpoint files: read tensors lazily from safetensors, write single or sharded files.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Tensors are read
one at a time with `safetensors.safe_open`, so converting a large model never holds two full
copies of it in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from protoformer.architectures.conversion import (
    HFConversionError,
    JSONDict,
    TensorRule,
    json_object,
)
from protoformer.jsonio import JSONFileError, clip, read_json_file

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "SafetensorsSource",
    "StateDictSource",
    "TensorSource",
    "load_rules",
    "name_listing",
    "natural_order",
    "read_config",
    "write_safetensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")

# safetensors' dtype names -> torch dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}


class TensorSource(Protocol):
    """Named tensors of a checkpoint, read on demand."""

    where: str

    def names(self) -> list[str]: ...

    def get(self, name: str) -> Tensor: ...

    def dtype(self, name: str) -> torch.dtype: ...


class StateDictSource:
    """The tensors of an in-memory state dict (a transformers model's `state_dict()`)."""

    def __init__(self, tensors: Mapping[str, Tensor], where: str) -> None:
        self.tensors = tensors
        self.where = where

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> Tensor:
        return self.tensors[name].detach()

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype


class RenamedSource:
    """`source` with some tensors read under new names (`renamed`: old name -> new name)."""

    def __init__(self, source: TensorSource, renamed: Mapping[str, str]) -> None:
        self.source = source
        self.where = source.where
        present = set(source.names())
        self.old_of = {new: old for old, new in renamed.items() if old in present}

    def names(self) -> list[str]:
        renamed = {old: new for new, old in self.old_of.items()}
        return [renamed.get(name, name) for name in self.source.names()]

    def get(self, name: str) -> Tensor:
        return self.source.get(self.old_of.get(name, name))

    def dtype(self, name: str) -> torch.dtype:
        return self.source.dtype(self.old_of.get(name, name))


class _Slice(Protocol):
    def get_dtype(self) -> str: ...


class _SafeOpen(Protocol):
    """The part of `safetensors.safe_open` used here (its stub leaves it untyped)."""

    def keys(self) -> list[str]: ...

    def get_tensor(self, name: str) -> Tensor: ...

    def get_slice(self, name: str) -> _Slice: ...


def _open_file(path: Path) -> _SafeOpen:
    from safetensors import safe_open

    try:
        return cast(_SafeOpen, safe_open(str(path), framework="pt"))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise HFConversionError(f"{path}: not a readable safetensors file ({error})") from error


def _is_plain_file_name(name: str) -> bool:
    """Whether `name` is one file name, naming nothing outside the directory it is joined to."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and Path(name).name == name and not Path(name).is_absolute()


def _json_object(path: Path) -> JSONDict:
    try:
        value = read_json_file(path, what=path.name)  # bounded size and depth
    except OSError as error:
        raise HFConversionError(f"{path}: cannot read it ({error.strerror or error})") from error
    except JSONFileError as error:
        raise HFConversionError(str(error)) from None
    try:
        return json_object(value)
    except TypeError:
        raise HFConversionError(f"{path}: expected a JSON object, got "
                                f"{type(value).__name__}") from None


def read_config(directory: Path) -> JSONDict:
    """The checkpoint's `config.json` as a mapping."""
    path = directory / "config.json"
    if not path.is_file():
        raise HFConversionError(f"{directory}: no config.json; a Hugging Face checkpoint "
                                "directory holds config.json and model.safetensors")
    return _json_object(path)


class SafetensorsSource:
    """The tensors of a checkpoint directory, single-file or sharded."""

    def __init__(self, directory: Path) -> None:
        self.where = str(directory)
        self.directory = directory
        self._files: dict[str, _SafeOpen] = {}
        index, single = directory / INDEX_FILE, directory / SINGLE_FILE
        if index.is_file():
            weight_map = _json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFConversionError(f"{index}: has no 'weight_map' object")
            self._where_is: dict[str, str] = {}
            for name, file in weight_map.items():  # pyright: ignore[reportUnknownVariableType]  # JSON object
                if not isinstance(name, str) or not isinstance(file, str):
                    raise HFConversionError(f"{index}: weight_map entry {name!r:.120}: {file!r:.120} must "
                                            "map a tensor name to a file name")
                if not _is_plain_file_name(file):  # no "../x", "/abs" or "sub/x": stay in directory
                    raise HFConversionError(f"{index}: weight_map entry {clip(repr(name))} names {clip(repr(file))}; "
                                            f"shards must be plain file names in {directory}")
                self._where_is[name] = file
            missing = sorted({f for f in self._where_is.values() if not (directory / f).is_file()})
            if missing:
                raise HFConversionError(f"{index} lists shard(s) that are not in {directory}: "
                                        f"{clip(', '.join(missing), 300)}")
        elif single.is_file():
            self._where_is = {name: SINGLE_FILE for name in self._file(SINGLE_FILE).keys()}
        else:
            present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise HFConversionError(
                f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (found: "
                f"{', '.join(present) or 'nothing'}); only safetensors checkpoints are read. "
                "Convert a pytorch_model.bin checkpoint by loading it with transformers and "
                "calling save_pretrained(directory)")

    def _file(self, file: str) -> _SafeOpen:
        handle = self._files.get(file)
        if handle is None:
            handle = self._files[file] = _open_file(self.directory / file)
        return handle

    def names(self) -> list[str]:
        return list(self._where_is)

    def get(self, name: str) -> Tensor:
        file = self._where_is[name]
        try:
            return self._file(file).get_tensor(name)
        except Exception as error:  # safetensors' own error type for a name it lacks
            raise HFConversionError(f"{self.directory / file}: cannot read tensor {name!r} "
                                    f"({error})") from error

    def dtype(self, name: str) -> torch.dtype:
        file = self._where_is[name]
        handle = self._file(file)
        try:
            stored = handle.get_slice(name).get_dtype()
        except Exception as error:  # safetensors' own error type for a name it lacks
            raise HFConversionError(f"{self.directory / file}: cannot read tensor {name!r} "
                                    f"({error})") from error
        dtype = _DTYPES.get(stored)
        if dtype is None:
            raise HFConversionError(f"{self.where}: tensor {name!r} is stored as {stored}; "
                                    f"expected a float type ({', '.join(_DTYPES)}); pass dtype=")
        return dtype


class _SaveFile(Protocol):
    def __call__(self, tensors: dict[str, Tensor], filename: str,
                 metadata: dict[str, str] | None = None) -> None: ...


def _remove_old_weights(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name in (SINGLE_FILE, INDEX_FILE) or _SHARD.fullmatch(path.name):
            path.unlink()


def write_safetensors(directory: Path, tensors: Mapping[str, Tensor], *,
                      max_shard_size: int | None = None) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or as shards of at most `max_shard_size` bytes.

    Shards (`model-00001-of-0000N.safetensors` and `model.safetensors.index.json`) are written
    only when the tensors exceed `max_shard_size`; a single tensor larger than it gets a shard
    of its own. Weight files from an earlier save in `directory` are removed first.
    """
    from safetensors import torch as safetensors_torch

    # The stub types `filename` as a bare PathLike; this is the signature used here.
    save_file = cast(_SaveFile, safetensors_torch.save_file)  # pyright: ignore[reportUnknownMemberType]  # see _SaveFile

    if max_shard_size is not None and max_shard_size < 1:
        raise ValueError(f"max_shard_size={max_shard_size}: must be a positive number of bytes")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    sizes = {name: t.numel() * t.element_size() for name, t in cpu.items()}
    total = sum(sizes.values())
    _remove_old_weights(directory)
    metadata = {"format": "pt"}
    if max_shard_size is None or total <= max_shard_size:
        path = directory / SINGLE_FILE
        save_file(cpu, str(path), metadata=metadata)
        return [path]
    shards: list[list[str]] = [[]]
    filled = 0
    for name in cpu:
        if shards[-1] and filled + sizes[name] > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: cpu[name] for name in names}, str(directory / file), metadata=metadata)
        weight_map.update(dict.fromkeys(names, file))
        paths.append(directory / file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*paths, directory / INDEX_FILE]


# --- loading by rules -----------------------------------------------------------------------


def natural_order(name: str) -> tuple[tuple[int, str], ...]:
    """A sort key putting `layers.2` before `layers.10`."""
    return tuple((int(part), "") if part.isdigit() else (-1, part)
                 for part in re.split(r"(\d+)", name))


def name_listing(title: str, names: list[str], limit: int = 200) -> str:
    """`names` as an indented block of an error message, headed `title (count):`."""
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {title} ({len(names)}):\n    {shown}{more}"


def load_rules(model: nn.Module, rules: list[TensorRule], source: TensorSource) -> None:
    """Fill every tensor of `model`'s state dict from `source` through its rule.

    The rules must cover the state dict exactly (else a `RuntimeError`: a bug in the mapping);
    a tensor that cannot be made, or comes out in another shape than the model's, is an
    `HFConversionError` naming both sides.
    """
    state = model.state_dict()
    filled = {rule.ours for rule in rules}
    if filled != set(state):
        raise RuntimeError(f"internal error: the mapping fills {sorted(filled - set(state))} "
                           f"that the model lacks and leaves {sorted(set(state) - filled)} empty")
    with torch.no_grad():
        for rule in rules:
            parts = [source.get(name) for name in rule.theirs]
            target = state[rule.ours]
            shapes = ", ".join(f"{name} {tuple(p.shape)}" for name, p in zip(rule.theirs, parts, strict=True))
            try:
                value = rule.to_ours(parts)
            except RuntimeError as error:
                raise HFConversionError(f"{source.where}: cannot make {rule.ours} "
                                        f"{tuple(target.shape)} from {shapes}: {error}") from error
            if value.shape != target.shape:
                raise HFConversionError(
                    f"{source.where}: {shapes} give {rule.ours} of shape {tuple(value.shape)}, "
                    f"but the config makes it {tuple(target.shape)}; the weights do not match "
                    "config.json")
            target.copy_(value)
