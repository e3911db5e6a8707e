"""The files of a checkpoint step directory: names, durable writes and checked reads.

Writes are fsynced and a finished step directory is published with one `os.replace` (see
`protoformer.train.checkpoint` for the layout and why a crash leaves the previous checkpoint
intact). Reads check each file (present, its size and checksum as recorded in state.json, a
readable safetensors or JSON file) and raise `CheckpointError` naming the file and the problem.
A file without a checksum record is refused unless the caller asks to skip verification
(`verify=False`, the CLI's `--no-verify`); state.json is read within size and depth limits.
What the files hold is `protoformer.train.checkpoint_state`'s business.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeAlias, cast

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file  # pyright: ignore[reportUnknownVariableType]  # os.PathLike left unparameterised upstream
from torch import Tensor

from protoformer.jsonio import JSONFileError, read_json_file

__all__ = [
    "CHECKPOINTS_DIR",
    "FORMAT_VERSION",
    "LATEST_FILE",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "TEMP_PREFIX",
    "CheckpointError",
    "JSONValue",
    "copy_files",
    "file_record",
    "honour_umask",
    "publish_step_directory",
    "read_safetensors",
    "read_state",
    "remove_stale_temps",
    "saved_expert_parallel_size",
    "saved_tensor_parallel_size",
    "shard_file_names",
    "step_directory_name",
    "swapped_out_copy",
    "verify_file",
    "write_safetensors",
    "write_text",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
MAX_STATE_BYTES = 64 * 1024 * 1024
"""Largest state.json read (64 MiB): options, optimizer scalars and RNG states are far less."""
MAX_STATE_DEPTH = 100
"""Deepest nesting of state.json accepted (it nests a handful of levels)."""
TEMP_PREFIX = ".tmp-"
"""Names starting with it are unfinished writes, removed by the next save."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model it is loaded into."""


def step_directory_name(step: int) -> str:
    """`step_000100` for step 100."""
    return f"step_{step:06d}"


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


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give `path` the permissions a plain `open`/`mkdir` would have (0666/0777 less the umask).

    safetensors writes files 0600 and `tempfile.mkdtemp` makes directories 0700, which would
    keep teammates on a shared machine from reading a run's checkpoints.
    """
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_current_umask())


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (contiguous, unshared) with `metadata` to `path`, durably."""
    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)
    _fsync_path(path)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` and fsync it."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        write_text(temp, text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def file_record(path: Path) -> dict[str, JSONValue]:
    """The size and checksum state.json records for a written file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def copy_files(directory: Path, files: Mapping[str, Path]) -> dict[str, JSONValue]:
    """Copy `files` (name in the checkpoint -> source) into `directory`, durably; returns their
    records for state.json's "files" (e.g. the run's tokenizer.json, which travels with it)."""
    records: dict[str, JSONValue] = {}
    for name, source in files.items():
        target = directory / name
        shutil.copyfile(source, target)
        _fsync_path(target)
        records[name] = file_record(target)
    return records


_OLD_PREFIX = f"{TEMP_PREFIX}old-"


def swapped_out_copy(root: Path, name: str) -> Path | None:
    """The published step directory `name` that a re-save moved aside, if the save was killed
    before the new copy took its place (`publish_step_directory`); None otherwise."""
    if (root / name).exists():
        return None
    for holder in sorted(root.glob(f"{_OLD_PREFIX}{name}-*")):
        if (holder / name).is_dir():
            return holder / name
    return None


def remove_stale_temps(root: Path) -> None:
    """Remove the leftovers of interrupted saves from a checkpoints directory.

    A step directory that an interrupted re-save had moved aside is put back first: it was
    complete and published, and `latest` may still name it."""
    for entry in sorted(root.glob(f"{_OLD_PREFIX}*")):
        name = entry.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
        copy = swapped_out_copy(root, name)
        if copy is not None and copy.parent == entry:
            os.replace(copy, root / name)
    for entry in root.glob(f"{TEMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def publish_step_directory(temp: Path, final: Path) -> None:
    """Move the fully written `temp` to `final` atomically and point `latest` at it.

    An existing `final` (the same step saved again) is swapped out and removed. Between the
    two renames of that swap the old copy sits in `.tmp-old-<name>-*/`: if the process dies
    there, readers find it (`swapped_out_copy`) and the next save puts it back.
    """
    root, name = final.parent, final.name
    honour_umask(temp)
    _fsync_path(temp)
    if final.exists():  # saving the same step again: swap the old one out
        old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{name}-", dir=root))
        os.replace(final, old / name)
        os.replace(temp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, final)
    _fsync_path(root)
    _write_text_atomic(root / LATEST_FILE, name + "\n")


# --- reading ------------------------------------------------------------------------------


def read_state(step_dir: str | Path) -> dict[str, JSONValue]:
    """The parsed state.json of a step directory."""
    path = Path(step_dir) / STATE_FILE
    try:
        document = cast("JSONValue", read_json_file(
            path, max_bytes=MAX_STATE_BYTES, max_depth=MAX_STATE_DEPTH, what=STATE_FILE))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from error
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from error
    except JSONFileError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(document, dict) or not isinstance(document.get("step"), int):
        raise CheckpointError(f"{path}: expected a JSON object with an integer 'step'")
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {document.get('format')!r}, this version of "
                              f"protoformer reads format {FORMAT_VERSION}")
    return document


def verify_file(path: Path, record: JSONValue, *, verify: bool = True) -> None:
    """Check that `path` exists and matches its state.json `record` (size and sha256).

    A missing or malformed record is refused: without it flipped bytes would load silently.
    `verify=False` skips the size and checksum comparison (the user asked for it).
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
    if not verify:
        return
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) \
            or not isinstance(record.get("sha256"), str):
        raise CheckpointError(
            f"{path}: {STATE_FILE} records no size and sha256 for this file (its 'files' entry "
            "is missing or malformed), so its contents cannot be verified; the checkpoint was "
            "edited or not written by protoformer. To load it anyway, skip verification "
            "(--no-verify, or verify=False)")
    size = path.stat().st_size
    if record.get("bytes") != size:
        raise CheckpointError(f"{path}: {size} bytes, but {record.get('bytes')} were written; "
                              "the file is truncated or was replaced")
    if record.get("sha256") != file_record(path)["sha256"]:
        raise CheckpointError(f"{path}: contents differ from what was written (sha256 "
                              "mismatch); the file is corrupt")


class _SafetensorsFile(Protocol):
    """What `safe_open` yields (safetensors ships it untyped)."""

    def metadata(self) -> dict[str, str] | None: ...

    def keys(self) -> list[str]: ...

    def get_tensor(self, name: str) -> Tensor: ...


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, on the CPU."""
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


def saved_tensor_parallel_size(document: Mapping[str, JSONValue]) -> int:
    """How many tensor-parallel ranks a checkpoint's state.json says it was saved from."""
    entry = document.get("tensor_parallel")
    size = entry.get("size") if isinstance(entry, dict) else None
    return size if isinstance(size, int) and size >= 1 else 1


def saved_expert_parallel_size(document: Mapping[str, JSONValue]) -> int:
    """How many expert-parallel ranks a checkpoint's state.json says it was saved from."""
    entry = document.get("expert_parallel")
    size = entry.get("size") if isinstance(entry, dict) else None
    return size if isinstance(size, int) and size >= 1 else 1


def shard_file_names(tp_rank: int, tp_size: int, ep_rank: int = 0,
                     ep_size: int = 1) -> tuple[str, str]:
    """The model and optimizer file names of tensor-parallel rank `tp_rank` of `tp_size` (and
    expert-parallel rank `ep_rank` of `ep_size`: each holds its own experts)."""
    if tp_size == 1 and ep_size == 1:
        return MODEL_FILE, OPTIMIZER_FILE
    suffix = f".tp{tp_rank:02d}-of-{tp_size:02d}" if tp_size > 1 else ""
    suffix += f".ep{ep_rank:02d}-of-{ep_size:02d}" if ep_size > 1 else ""
    return f"model{suffix}.safetensors", f"optimizer{suffix}.safetensors"
