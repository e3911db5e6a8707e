"""Tokenize text into token shards once, so training streams them (`protoformer prepare-data`).

Sources are read in path order: a text file is one document (read in ~1 MiB pieces cut at
line ends, so a file of any size streams), a `.jsonl` file holds one document per line (the
`text_key` field of each JSON object), a `.parquet` file one per row of its `text_key` column
(needs pyarrow). A directory contributes every non-hidden file under it; binary files (a NUL
byte in the first 8 KiB) are skipped and named. Each document's tokens (with the tokenizer's
special tokens, e.g. a BOS) are followed by its end-of-text token when it has one. Texts are
encoded in batches by `tokenizers`' threads and written by `ShardWriter`.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from protoformer.interop.hf_tokenizer import TOKENIZER_FILE
from protoformer.train.data import DataError
from protoformer.train.token_shards import INDEX_FILE, ShardIndex, ShardWriter, read_index
from protoformer.train.tokenizer import RunTokenizer

__all__ = ["DEFAULT_SHARD_TOKENS", "PreparedData", "prepare_data", "source_files"]

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 tokens per shard
_PIECE_BYTES = 1 << 20  # a text file is read and encoded in pieces of about this size
_BATCH_BYTES = 8 << 20  # texts encoded together by one `encode_batch`
_BINARY_PROBE_BYTES = 8192


@dataclass
class PreparedData:
    """What `prepare_data` wrote."""

    index: ShardIndex
    num_files: int
    skipped_files: list[str] = field(default_factory=list[str])


@dataclass(frozen=True)
class _Piece:
    text: str
    starts_document: bool
    ends_document: bool
    source_bytes: int  # bytes of the source file it consumed (for the progress bar)


def source_files(path: Path) -> list[Path]:
    """The files `path` names: itself, or every non-hidden file under a directory, sorted."""
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist; pass a text, .jsonl or "
                        ".parquet file or a directory of them")
    if path.is_file():
        return [path]
    files = sorted(item for item in path.rglob("*")
                   if item.is_file() and not any(part.startswith(".")
                                                 for part in item.relative_to(path).parts))
    if not files:
        raise DataError(f"data directory {str(path)!r} contains no files")
    return files


def _is_binary(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\0" in handle.read(_BINARY_PROBE_BYTES)


def _text_pieces(path: Path) -> Iterator[_Piece]:
    """A text file as pieces of about 1 MiB, each ending at a line end (UTF-8 safe)."""
    with path.open("rb") as handle:
        pending = b""
        first = True
        while True:
            block = handle.read(_PIECE_BYTES)
            data = pending + block
            if not block:
                yield _Piece(data.decode("utf-8", errors="replace"), first, True, len(pending))
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no line end yet: keep reading (a piece never splits a character)
                pending = data
                continue
            piece, pending = data[:cut], data[cut:]
            yield _Piece(piece.decode("utf-8", errors="replace"), first, False, len(block))
            first = False


def _jsonl_pieces(path: Path, text_key: str) -> Iterator[_Piece]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record: object = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}:{number}: not a JSON object ({error})") from error
            value = cast("dict[str, object]", record).get(text_key) \
                if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise DataError(f"{path}:{number}: no string field {text_key!r}; name the text "
                                "field with --text-key")
            yield _Piece(value, True, True, len(line))


def _parquet_pieces(path: Path, text_key: str) -> Iterator[_Piece]:
    try:
        parquet = importlib.import_module("pyarrow.parquet")  # optional: pyarrow is untyped
    except ImportError:
        raise ImportError(f"{path}: reading .parquet files needs pyarrow; install it with "
                          "`pip install pyarrow` (or `pip install protoformer[parquet]`), or "
                          "convert the data to .jsonl") from None
    table_file = parquet.ParquetFile(str(path))
    names = [str(name) for name in table_file.schema_arrow.names]
    if text_key not in names:
        raise DataError(f"{path}: no column {text_key!r} (columns: {', '.join(names)}); name "
                        "the text column with --text-key")
    size = path.stat().st_size
    rows = max(int(table_file.metadata.num_rows), 1)
    for batch in table_file.iter_batches(columns=[text_key]):
        for value in cast("list[object]", batch.column(0).to_pylist()):
            if not isinstance(value, str):
                raise DataError(f"{path}: column {text_key!r} holds a {type(value).__name__}, "
                                "not text")
            yield _Piece(value, True, True, size // rows)


def _pieces(path: Path, text_key: str) -> Iterator[_Piece]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_pieces(path, text_key)
    if suffix == ".parquet":
        return _parquet_pieces(path, text_key)
    return _text_pieces(path)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory for the dataset")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"--out {out} is not empty; give a new directory, or --overwrite "
                            "to replace the dataset in it")
        if not (out / INDEX_FILE).is_file():
            raise DataError(f"--out {out} holds files but no {INDEX_FILE}: it is not a dataset "
                            "directory, so --overwrite does not empty it; give another --out")
        shutil.rmtree(out)


def prepare_data(source: Path, out: Path, tokenizer: RunTokenizer, *, text_key: str = "text",
                 validation_fraction: float = 0.05, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 overwrite: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> PreparedData:
    """Tokenize the documents under `source` into shards in `out`; returns the checked index.

    `on_progress(done, total)` follows the source bytes read. The last `validation_fraction`
    of the tokens are the validation split (recorded in the index).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"--validation-fraction {validation_fraction}: must be between 0 and 1")
    files = source_files(source)
    _check_out(out, overwrite)
    total = sum(path.stat().st_size for path in files)
    writer = ShardWriter(out, vocab_size=tokenizer.vocab_size, shard_tokens=shard_tokens)
    skipped: list[str] = []
    used = 0
    done = 0
    text_bytes = 0
    batch: list[_Piece] = []
    batch_bytes = 0
    document: list[np.ndarray[tuple[int], np.dtype[np.int64]]] = []

    def flush() -> None:
        nonlocal text_bytes
        # A document's first piece gets the tokenizer's special tokens (e.g. BOS), later ones not.
        encoded: list[list[int]] = [[] for _ in batch]
        for special in (True, False):
            chosen = [i for i, piece in enumerate(batch) if piece.starts_document == special]
            if chosen:
                ids_list = tokenizer.tokenizer.encode_batch([batch[i].text for i in chosen],
                                                            add_special_tokens=special)
                for i, ids in zip(chosen, ids_list, strict=True):
                    encoded[i] = ids
        for piece, ids in zip(batch, encoded, strict=True):
            text_bytes += len(piece.text.encode("utf-8"))
            document.append(np.asarray(ids, dtype=np.int64))
            if piece.ends_document:
                if tokenizer.eos_token_id is not None:
                    document.append(np.asarray([tokenizer.eos_token_id], dtype=np.int64))
                writer.add_document(np.concatenate(document))
                document.clear()
        batch.clear()

    for path in files:
        if path.suffix.lower() not in (".jsonl", ".parquet") and _is_binary(path):
            skipped.append(str(path.relative_to(source)) if source.is_dir() else path.name)
            done += path.stat().st_size
            continue
        used += 1
        for piece in _pieces(path, text_key):
            batch.append(piece)
            batch_bytes += len(piece.text)
            done = min(done + piece.source_bytes, total)
            if batch_bytes >= _BATCH_BYTES:
                flush()
                batch_bytes = 0
                if on_progress is not None:
                    on_progress(done, total)
    flush()
    if on_progress is not None:
        on_progress(total, total)
    writer.finish()
    if writer.num_tokens == 0:
        raise DataError(f"no text to train on in {source} ({len(files)} file(s), "
                        f"{len(skipped)} of them binary)")
    if tokenizer.file is not None:
        shutil.copyfile(tokenizer.file, out / TOKENIZER_FILE)
    writer.write_index(text_bytes=text_bytes,
                       validation_tokens=round(writer.num_tokens * validation_fraction),
                       tokenizer=dict(tokenizer.to_json()), sources=[str(source)])
    return PreparedData(index=read_index(out), num_files=used, skipped_files=skipped)
