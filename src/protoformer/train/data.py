"""Raw-text training data: the default corpus, the train/validation split and batch sampling.

By default tokens are bytes (vocabulary 256), so any text trains without a tokenizer; with a
tokenizer each file is encoded as one document. With no `--data`, the corpus is the Python
standard library's own source, which every Python install carries: `*.py` files under
`sysconfig.get_paths()["stdlib"]`, sorted by path and read until a byte budget is spent, so
the same interpreter always yields the same corpus. A `--data` path of raw text is read whole
into memory, so it must fit the budget: a larger one is refused (never cut short) with a
pointer to `protoformer prepare-data`, whose memory-mapped token shards
(`protoformer.train.token_shards`) have no size limit. The samplers here draw windows from
either kind of token stream.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = [
    "BYTE_VOCAB_SIZE",
    "DEFAULT_MAX_CORPUS_BYTES",
    "BatchSampler",
    "Corpus",
    "DataError",
    "TextEncoder",
    "TokenStream",
    "load_corpus",
    "num_tokens",
    "stdlib_source_files",
    "validation_batches",
]

BYTE_VOCAB_SIZE = 256
DEFAULT_MAX_CORPUS_BYTES = 8 * 1024 * 1024
DEFAULT_VALIDATION_FRACTION = 0.05
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
    """The training data cannot be used: missing or unreadable path, empty or too small corpus."""


class TokenStream(Protocol):
    """A token sequence too large to hold in memory (e.g. `TokenShards`): read by windows."""

    def __len__(self) -> int: ...

    def read(self, start: int, length: int) -> npt.NDArray[np.int64]: ...


class TextEncoder(Protocol):
    """Encodes many texts to token ids at once (a run's tokenizer)."""

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]: ...


@dataclass(frozen=True)
class Corpus:
    """A corpus's tokens, split into a training part and the validation part that follows it."""

    train: Tensor  # [n_train] uint8 (bytes) or int64 (tokenizer ids)
    validation: Tensor  # [n_validation]
    source: str
    num_files: int
    fingerprint: str = ""  # sha256 of the corpus bytes: a resumed run checks it is unchanged
    skipped_files: tuple[str, ...] = ()  # binary files a --data directory held, not read
    text_bytes: int = -1  # bytes of text the tokens encode (-1: one byte per token)

    @property
    def num_bytes(self) -> int:
        """Bytes of text read (the number of tokens for a byte-level corpus)."""
        return self.text_bytes if self.text_bytes >= 0 else self.num_tokens

    @property
    def num_tokens(self) -> int:
        return self.train.numel() + self.validation.numel()


def stdlib_source_files() -> list[Path]:
    """The standard library's `*.py` files, sorted by path (third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path for path in root.rglob("*.py")
             if _SKIPPED_DIRS.isdisjoint(path.relative_to(root).parts) and path.is_file()]
    return sorted(files)


_BINARY_PROBE_BYTES = 8192  # a NUL byte in a file's first 8 KiB marks it binary (git's test)


def _non_hidden_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*")
                  if path.is_file() and not any(part.startswith(".")
                                                for part in path.relative_to(directory).parts))


def _read_capped(files: list[Path], max_bytes: int, *, skip_unreadable: bool,
                 skip_binary: bool = False) -> tuple[list[bytes], list[Path], bool]:
    """Read `files` in order until `max_bytes` are read.

    Returns (the contents of each file used, binary files skipped, whether bytes were left
    unread). With `skip_binary`, a file whose first 8 KiB hold a NUL byte is left out; files
    after the budget is spent are never opened.
    """
    chunks: list[bytes] = []
    total = 0
    binary: list[Path] = []
    for number, path in enumerate(files):
        if total >= max_bytes:
            return chunks, binary, _any_bytes(files[number:])
        try:
            with path.open("rb") as handle:
                head = handle.read(_BINARY_PROBE_BYTES) if skip_binary else b""
                if b"\0" in head:
                    binary.append(path)
                    continue
                # One byte past the budget tells whether the file was cut short.
                data = head + handle.read(max(max_bytes - total - len(head) + 1, 0))
        except OSError as error:
            if skip_unreadable:
                continue
            raise DataError(f"cannot read data file {path}: {error.strerror or error}") from error
        if len(data) > max_bytes - total:
            chunks.append(data[:max_bytes - total])
            return chunks, binary, True
        if data:
            chunks.append(data)
            total += len(data)
    return chunks, binary, False


def _any_bytes(files: list[Path]) -> bool:
    return any(path.stat().st_size > 0 for path in files if path.is_file())


def _too_large(root: Path, max_bytes: int) -> DataError:
    return DataError(
        f"data path {str(root)!r} holds more than {max_bytes:,} bytes of text, the limit for raw "
        f"text (read into memory; --max-corpus-bytes); tokenize it once into memory-mapped "
        f"shards with `protoformer prepare-data {root} --out DATASET_DIR` and train with "
        "--data DATASET_DIR (no size limit), or raise --max-corpus-bytes")


def _encode_documents(chunks: list[bytes], tokenizer: TextEncoder,
                      eos_token_id: int | None) -> Tensor:
    """Each file's text as one document: its tokens, then the end-of-text token (if any)."""
    texts = [chunk.decode("utf-8", errors="replace") for chunk in chunks]
    ids: list[int] = []
    for document in tokenizer.encode_batch(texts, add_special_tokens=True):
        ids.extend(document)
        if eos_token_id is not None:
            ids.append(eos_token_id)
    return torch.tensor(ids, dtype=torch.int64)  # [n]


def _byte_tensor(data: bytes) -> Tensor:
    # bytearray: torch.frombuffer warns on read-only buffers.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()  # [n]


def load_corpus(
    path: str | Path | None = None,
    *,
    sequence_length: int,
    max_bytes: int = DEFAULT_MAX_CORPUS_BYTES,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    tokenizer: TextEncoder | None = None,
    eos_token_id: int | None = None,
) -> Corpus:
    """Read a text corpus, tokenize it and split off its last `validation_fraction`.

    `path` is a text file or a directory (every non-hidden file under it, sorted by path,
    except binary files: those with a NUL byte in their first 8 KiB, listed in
    `Corpus.skipped_files`); more than `max_bytes` of text raises `DataError` pointing to
    `protoformer prepare-data`. None reads the standard library's source up to `max_bytes`.
    Tokens are the bytes, or with `tokenizer` each file's tokens followed by `eos_token_id`.
    Both parts hold at least one window of `sequence_length + 1` tokens, so a sampler can
    draw from each; a corpus too small for that raises `DataError`. `Corpus.fingerprint` is
    the sha256 of the bytes read.
    """
    if sequence_length < 1:
        raise DataError(f"sequence_length={sequence_length}: must be >= 1")
    if max_bytes < 1:
        raise DataError(f"max_bytes={max_bytes}: must be >= 1")
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction}: must be between 0 and 1")
    skipped: tuple[str, ...] = ()
    if path is None:
        files = stdlib_source_files()
        source = f"Python standard library source ({sysconfig.get_paths()['stdlib']})"
        chunks, _, _ = _read_capped(files, max_bytes, skip_unreadable=True)  # a budget, by design
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(f"data path {str(root)!r} does not exist; pass a text file or a "
                            "directory of text files with --data")
        is_dir = root.is_dir()
        files = _non_hidden_files(root) if is_dir else [root]
        if not files:
            raise DataError(f"data directory {str(root)!r} contains no files")
        source = str(root)
        chunks, binary, truncated = _read_capped(files, max_bytes, skip_unreadable=False,
                                                 skip_binary=True)
        if truncated:
            raise _too_large(root, max_bytes)
        if not chunks and binary and len(binary) == len(files):
            if not is_dir:
                raise DataError(f"data file {str(root)!r} is binary (a NUL byte in its first "
                                "8 KiB), not text; pass a text file or a directory of them")
            raise DataError(f"data directory {str(root)!r} holds only binary files "
                            f"({len(binary)}, e.g. {binary[0].name}); pass text files")
        skipped = tuple(str(path.relative_to(root)) for path in binary) if is_dir else ()
    data = b"".join(chunks)
    if not data:
        raise DataError(f"the corpus from {source} is empty: {len(files)} file(s), 0 bytes")
    tokens = (_byte_tensor(data) if tokenizer is None  # [n]
              else _encode_documents(chunks, tokenizer, eos_token_id))
    unit = "bytes" if tokenizer is None else "tokens"
    count = tokens.numel()
    window = sequence_length + 1
    # The last fraction validates, but never less than one window.
    num_validation = max(int(count * validation_fraction), window)
    if count - num_validation < window:
        raise DataError(
            f"the corpus from {source} has {count} {unit}, too few for sequence length "
            f"{sequence_length}: a training and a validation window need at least "
            f"{2 * window} {unit}; give more text or a smaller --seq-len")
    split = count - num_validation
    return Corpus(train=tokens[:split], validation=tokens[split:], source=source,
                  num_files=len(chunks), fingerprint=hashlib.sha256(data).hexdigest(),
                  skipped_files=skipped, text_bytes=len(data))


Tokens = Tensor | TokenStream
"""A 1-D token tensor in memory, or a stream read by windows (memory-mapped shards)."""


def num_tokens(tokens: Tokens) -> int:
    return tokens.numel() if isinstance(tokens, Tensor) else len(tokens)


def _check_sizes(tokens: Tokens, batch_size: int, sequence_length: int,
                 dp_rank: int, dp_size: int) -> None:
    if isinstance(tokens, Tensor) and tokens.dim() != 1:
        raise DataError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or sequence_length < 1:
        raise DataError(f"batch_size={batch_size} and sequence_length={sequence_length} "
                        "must both be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
    if num_tokens(tokens) < sequence_length + 1:
        raise DataError(f"{num_tokens(tokens)} tokens are fewer than one window of "
                        f"sequence_length + 1 = {sequence_length + 1}")


def _windows(tokens: Tokens, starts: Tensor, sequence_length: int) -> Tensor:
    if not isinstance(tokens, Tensor):  # memory-mapped: read each window
        rows = [tokens.read(int(starts[i]), sequence_length + 1) for i in range(starts.numel())]
        return torch.as_tensor(np.stack(rows))  # [b, s + 1] int64
    offsets = torch.arange(sequence_length + 1)  # [s + 1]
    index = starts[:, None] + offsets[None, :]  # [b, s + 1]
    return tokens[index].long()  # [b, s + 1]


class BatchSampler:
    """Random windows of `sequence_length + 1` tokens, `[batch_size, sequence_length + 1]` each.

    The window starts come from a `torch.Generator` seeded with `seed`. Data-parallel ranks
    share the seed and draw the same `dp_size * batch_size` starts, each keeping its own
    slice, so the global batch does not depend on how it is split across ranks. `state_dict`
    / `load_state_dict` save and restore the position, for exact resumption.
    """

    def __init__(self, tokens: Tokens, batch_size: int, sequence_length: int, *, seed: int,
                 dp_rank: int = 0, dp_size: int = 1) -> None:
        _check_sizes(tokens, batch_size, sequence_length, dp_rank, dp_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> Tensor:
        """The next `[batch_size, sequence_length + 1]` int64 batch of this rank."""
        num_starts = num_tokens(self.tokens) - self.sequence_length  # valid window starts
        starts = torch.randint(0, num_starts, (self.dp_size * self.batch_size,),
                               generator=self.generator)  # [dp * b]
        mine = starts[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size]  # [b]
        self.batches_drawn += 1
        return _windows(self.tokens, mine, self.sequence_length)  # [b, s + 1]

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        generator = state["generator"]
        batches = state["batches_drawn"]
        if not isinstance(generator, Tensor) or not isinstance(batches, int):
            raise DataError("sampler state needs a 'generator' tensor and a 'batches_drawn' int")
        self.generator.set_state(generator)
        self.batches_drawn = batches


def validation_batches(tokens: Tokens, batch_size: int, sequence_length: int, num_batches: int,
                       *, dp_rank: int = 0, dp_size: int = 1) -> list[Tensor]:
    """Fixed validation batches: windows spread evenly over `tokens`, the same on every call.

    Up to `num_batches` batches of `[batch_size, sequence_length + 1]`; fewer when the tokens
    hold fewer windows. Data-parallel ranks take interleaved batches of the same list.
    """
    _check_sizes(tokens, batch_size, sequence_length, dp_rank, dp_size)
    if num_batches < 1:
        raise DataError(f"num_batches={num_batches}: must be >= 1")
    last_start = num_tokens(tokens) - sequence_length - 1
    wanted = num_batches * dp_size * batch_size
    # Evenly spaced starts: disjoint windows when the tokens hold enough, overlapping otherwise.
    count = min(wanted, last_start + 1)
    starts = torch.linspace(0, last_start, count).round().long()  # [count]
    usable = (count // batch_size) * batch_size
    if usable == 0:
        usable = count
    batches = [_windows(tokens, starts[i:i + batch_size], sequence_length)
               for i in range(0, usable, batch_size)]
    return batches[dp_rank::dp_size] or batches[:1]
