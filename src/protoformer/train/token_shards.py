"""Token shards: a tokenized corpus on disk, memory-mapped for training (nanoGPT/Megatron style).

A dataset directory holds `shard_00000.bin`, `shard_00001.bin`, ... (the token ids, raw
little-endian `uint16` when the vocabulary has fewer than 65,536 ids, else `uint32`), the
tokenizer that made them (`tokenizer.json`, absent for bytes) and `index.json`:

    {"format": "protoformer-token-shards", "version": 1, "dtype": "uint16",
     "vocab_size": 50257, "num_tokens": N, "num_documents": D, "text_bytes": B,
     "validation_tokens": V, "tokenizer": {...}, "sources": [...],
     "shards": [{"file": "shard_00000.bin", "tokens": n, "bytes": 2 * n, "sha256": "...",
                 "documents": d}, ...]}

The shards read as one stream of `num_tokens` tokens (documents follow each other, separated
by the tokenizer's end-of-text token when it has one); its last `validation_tokens` are the
validation split. `read_index` checks every shard's size and sha256 before training uses it,
so a truncated or corrupt shard is refused with the file named. `TokenShards` reads windows
from the memory-mapped files, so a corpus of any size trains without being loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import numpy.typing as npt

from protoformer.train.data import DataError
from protoformer.train.tokenizer import file_sha256

__all__ = [
    "FORMAT_NAME",
    "INDEX_FILE",
    "ShardIndex",
    "ShardRecord",
    "ShardWriter",
    "TokenShards",
    "is_token_dataset",
    "read_index",
    "token_dtype",
]

INDEX_FILE = "index.json"
FORMAT_NAME = "protoformer-token-shards"
FORMAT_VERSION = 1
_DTYPES: dict[str, np.dtype[np.unsignedinteger[Any]]] = {
    "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
TokenArray = npt.NDArray[np.int64]


def token_dtype(vocab_size: int) -> str:
    """`uint16` for a vocabulary below 65,536 ids, else `uint32`."""
    return "uint16" if vocab_size < 1 << 16 else "uint32"


def is_token_dataset(path: Path) -> bool:
    """Whether `path` is a prepared dataset directory (it holds an index.json)."""
    return path.is_dir() and (path / INDEX_FILE).is_file()


@dataclass(frozen=True)
class ShardRecord:
    """One shard file: its name, token count, size and checksum."""

    file: str
    tokens: int
    bytes: int
    sha256: str
    documents: int


@dataclass(frozen=True)
class ShardIndex:
    """A dataset directory's index.json, checked."""

    directory: Path
    dtype: str
    vocab_size: int
    num_tokens: int
    num_documents: int
    text_bytes: int
    validation_tokens: int
    shards: tuple[ShardRecord, ...]
    tokenizer: dict[str, object]
    fingerprint: str  # sha256 of index.json (which holds every shard's sha256)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token, over the whole corpus."""
        return self.text_bytes / self.num_tokens if self.num_tokens else 1.0


class ShardWriter:
    """Writes token ids into shards of `shard_tokens` tokens, then the index.

    Each shard is written under a temporary name and renamed when complete, and index.json
    last (atomically), so a directory with an index.json is a finished dataset.
    """

    def __init__(self, directory: Path, *, vocab_size: int, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise DataError(f"shard_tokens={shard_tokens}: must be >= 1")
        self.directory = directory
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.records: list[ShardRecord] = []
        self.num_tokens = 0
        self.num_documents = 0
        self._handle: BinaryIO | None = None
        self._open_tokens = 0
        self._open_documents = 0
        self._digest = hashlib.sha256()
        directory.mkdir(parents=True, exist_ok=True)

    def _shard_path(self, number: int) -> Path:
        return self.directory / f"shard_{number:05d}.bin"

    def _write(self, ids: npt.NDArray[np.int64]) -> None:
        if self._handle is None:
            path = self._shard_path(len(self.records))
            self._handle = path.with_name(f".tmp-{path.name}").open("wb")
        data = ids.astype(_DTYPES[self.dtype]).tobytes()
        self._handle.write(data)
        self._digest.update(data)
        self._open_tokens += int(ids.size)

    def add_document(self, ids: npt.NDArray[np.int64]) -> None:
        """Append one document's token ids (split across shards when a shard fills)."""
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise DataError(f"token id {int(ids.max())} is outside the tokenizer's vocabulary "
                            f"of {self.vocab_size}")
        self.num_documents += 1
        self._open_documents += 1
        position = 0
        while position < ids.size:
            room = self.shard_tokens - self._open_tokens
            part = ids[position:position + room]
            self._write(part)
            position += int(part.size)
            if self._open_tokens == self.shard_tokens:
                self._finish_shard()

    def finish(self) -> None:
        """Finish the shard being written (call before `write_index`)."""
        self._finish_shard()

    def _finish_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        path = self._shard_path(len(self.records))
        os.replace(path.with_name(f".tmp-{path.name}"), path)
        itemsize = _DTYPES[self.dtype].itemsize
        self.records.append(ShardRecord(file=path.name, tokens=self._open_tokens,
                                        bytes=self._open_tokens * itemsize,
                                        sha256=self._digest.hexdigest(),
                                        documents=self._open_documents))
        self.num_tokens += self._open_tokens
        self._open_tokens = 0
        self._open_documents = 0
        self._digest = hashlib.sha256()

    def write_index(self, *, text_bytes: int, validation_tokens: int,
                    tokenizer: dict[str, object], sources: list[str]) -> Path:
        """Finish the last shard and write index.json; returns its path."""
        self._finish_shard()
        document = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": self.dtype,
            "vocab_size": self.vocab_size, "num_tokens": self.num_tokens,
            "num_documents": self.num_documents, "text_bytes": text_bytes,
            "validation_tokens": validation_tokens, "tokenizer": tokenizer, "sources": sources,
            "shards": [record.__dict__ for record in self.records]}
        path = self.directory / INDEX_FILE
        temp = path.with_name(f".tmp-{INDEX_FILE}")
        temp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        os.replace(temp, path)
        return path


def _int_field(document: dict[str, object], name: str, where: Path) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: '{name}' must be a non-negative integer, got {value!r}; "
                        "the index is corrupt: prepare the dataset again")
    return value


def _shard_record(entry: object, where: Path) -> ShardRecord:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: a 'shards' entry is not an object; the index is corrupt")
    fields = cast("dict[str, object]", entry)
    name, digest = fields.get("file"), fields.get("sha256")
    if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"{where}: shard file name {name!r} is not a plain file name")
    if not isinstance(digest, str):
        raise DataError(f"{where}: shard {name} has no sha256; the index is corrupt")
    return ShardRecord(file=name, tokens=_int_field(fields, "tokens", where),
                       bytes=_int_field(fields, "bytes", where), sha256=digest,
                       documents=_int_field(fields, "documents", where))


def read_index(directory: str | Path, *, verify_checksums: bool = True) -> ShardIndex:
    """The checked index of a dataset directory.

    Every shard must exist with the size the index records (tokens x dtype size) and, with
    `verify_checksums`, the same sha256; otherwise `DataError` names the shard and the fix.
    """
    root = Path(directory)
    path = root / INDEX_FILE
    try:
        raw = path.read_bytes()
        parsed: object = json.loads(raw)
    except FileNotFoundError:
        raise DataError(f"{root}: no {INDEX_FILE}; prepare a token dataset with "
                        "`protoformer prepare-data`") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable JSON index ({error})") from error
    if not isinstance(parsed, dict):
        raise DataError(f"{path}: expected a JSON object")
    document = cast("dict[str, object]", parsed)
    if document.get("format") != FORMAT_NAME or document.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a {FORMAT_NAME} index of version {FORMAT_VERSION} "
                        f"(format {document.get('format')!r}, version {document.get('version')!r})")
    dtype = document.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise DataError(f"{path}: dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    shards_field = document.get("shards")
    if not isinstance(shards_field, list) or not shards_field:
        raise DataError(f"{path}: lists no shards; prepare the dataset again")
    shards = tuple(_shard_record(entry, path) for entry in cast("list[object]", shards_field))
    num_tokens = _int_field(document, "num_tokens", path)
    if sum(record.tokens for record in shards) != num_tokens:
        raise DataError(f"{path}: the shards hold {sum(r.tokens for r in shards)} tokens, but "
                        f"num_tokens is {num_tokens}; the index is corrupt")
    itemsize = _DTYPES[dtype].itemsize
    for record in shards:
        shard = root / record.file
        if not shard.is_file():
            raise DataError(f"{shard}: missing; the dataset is incomplete, prepare it again")
        size = shard.stat().st_size
        if size != record.tokens * itemsize or size != record.bytes:
            raise DataError(f"{shard}: {size} bytes, but the index records {record.tokens} "
                            f"{dtype} tokens ({record.tokens * itemsize} bytes); the shard is "
                            "truncated or was replaced, prepare the dataset again")
        if verify_checksums and file_sha256(shard) != record.sha256:
            raise DataError(f"{shard}: contents differ from what was written (sha256 "
                            "mismatch); the shard is corrupt, prepare the dataset again")
    tokenizer = document.get("tokenizer")
    return ShardIndex(
        directory=root, dtype=dtype, vocab_size=_int_field(document, "vocab_size", path),
        num_tokens=num_tokens, num_documents=_int_field(document, "num_documents", path),
        text_bytes=_int_field(document, "text_bytes", path),
        validation_tokens=_int_field(document, "validation_tokens", path), shards=shards,
        tokenizer=cast("dict[str, object]", tokenizer) if isinstance(tokenizer, dict) else {},
        fingerprint=hashlib.sha256(raw).hexdigest())


class TokenShards:
    """Tokens `[begin, end)` of a dataset's shard stream, read from memory-mapped files.

    `read(start, length)` copies `length` tokens starting at `start` (relative to `begin`)
    as int64, crossing shard boundaries as needed; nothing else is loaded into memory.
    """

    def __init__(self, index: ShardIndex, begin: int = 0, end: int | None = None) -> None:
        stop = index.num_tokens if end is None else end
        if not 0 <= begin <= stop <= index.num_tokens:
            raise DataError(f"token range [{begin}, {stop}) is outside the dataset's "
                            f"{index.num_tokens} tokens")
        self.index = index
        self.begin = begin
        self.end = stop
        self._maps: list[np.memmap[Any, np.dtype[np.unsignedinteger[Any]]]] = []
        self._starts: list[int] = []  # stream offset of each shard
        offset = 0
        dtype = _DTYPES[index.dtype]
        for record in index.shards:
            self._starts.append(offset)
            self._maps.append(np.memmap(index.directory / record.file, dtype=dtype, mode="r",
                                        shape=(record.tokens,)))
            offset += record.tokens

    def __len__(self) -> int:
        return self.end - self.begin

    def slice(self, begin: int, end: int) -> TokenShards:
        """Tokens `[begin, end)` of this range (offsets relative to it)."""
        return TokenShards(self.index, self.begin + begin, self.begin + end)

    def read(self, start: int, length: int) -> TokenArray:
        """`length` tokens from `start` (relative to this range) as an int64 array."""
        if start < 0 or length < 0 or start + length > len(self):
            raise DataError(f"tokens [{start}, {start + length}) are outside this range of "
                            f"{len(self)} tokens")
        out = np.empty(length, dtype=np.int64)  # [length]
        position = self.begin + start
        filled = 0
        shard = int(np.searchsorted(self._starts, position, side="right")) - 1
        while filled < length:
            local = position - self._starts[shard]
            take = min(length - filled, self._maps[shard].shape[0] - local)
            out[filled:filled + take] = self._maps[shard][local:local + take]
            filled += take
            position += take
            shard += 1
        return out
