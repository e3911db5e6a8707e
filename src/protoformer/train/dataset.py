"""A run's training data and tokenizer, from `--data`, `--tokenizer` and `--init-from-hf`.

`--data` is a prepared token dataset (a directory with an index.json, from `protoformer
prepare-data`: streamed from memory-mapped shards, any size), raw text (a file or directory,
read into memory up to `--max-corpus-bytes`), or nothing (the standard library's source).
The tokenizer is, first to last: the one a resumed checkpoint holds, `--tokenizer`, the
dataset's, the Hugging Face checkpoint's tokenizer.json, bytes. A dataset made with another
tokenizer than the run's is refused, as is a model whose vocabulary cannot hold its ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from protoformer.interop.hf_tokenizer import TOKENIZER_FILE
from protoformer.train.data import DataError, Tokens, load_corpus, num_tokens
from protoformer.train.token_shards import TokenShards, is_token_dataset, read_index
from protoformer.train.tokenizer import BYTE_TOKENIZER, RunTokenizer, load_run_tokenizer

__all__ = ["TrainingData", "bits_per_byte", "load_training_data", "resolve_run_tokenizer"]


@dataclass(frozen=True)
class TrainingData:
    """Training and validation tokens, the tokenizer that made them, and how to describe them."""

    train: Tokens
    validation: Tokens
    tokenizer: RunTokenizer
    source: str
    fingerprint: str  # sha256 of the raw bytes, or of the dataset's index (a resume checks it)
    num_tokens: int
    text_bytes: int  # bytes of text the tokens encode
    description: str  # the `data:` line a run prints

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / self.num_tokens if self.num_tokens else 1.0

    def record(self) -> dict[str, str | int]:
        """What a checkpoint stores about the data (compared on resume)."""
        return {"source": self.source, "bytes": self.text_bytes, "tokens": self.num_tokens,
                "sha256": self.fingerprint}


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Bits per byte of text from a mean loss in nats per token."""
    return loss / math.log(2.0) / bytes_per_token


def resolve_run_tokenizer(*, tokenizer: str | None, data: Path | None, init_from_hf: Path | None,
                          checkpoint: Path | None) -> RunTokenizer:
    """The run's tokenizer (see the module docstring for the order).

    A resumed run keeps its checkpoint's tokenizer; a `tokenizer` naming another one that
    exists is refused (a path that is gone is the one the run started from, moved away)."""
    if checkpoint is not None:
        copy = checkpoint / TOKENIZER_FILE
        saved = load_run_tokenizer(copy if copy.is_file() else BYTE_TOKENIZER)
        named = tokenizer is not None and (tokenizer == BYTE_TOKENIZER or Path(tokenizer).exists())
        if named and load_run_tokenizer(tokenizer).sha256 != saved.sha256:
            raise ValueError(f"--tokenizer {tokenizer} is not the tokenizer the run in "
                             f"{checkpoint.parent.parent} trained with ({saved.describe()}); a "
                             "resumed run keeps its tokenizer: drop --tokenizer")
        return saved
    if tokenizer is not None:
        return load_run_tokenizer(tokenizer)
    if data is not None and is_token_dataset(data):
        shipped = data / TOKENIZER_FILE
        return load_run_tokenizer(shipped if shipped.is_file() else BYTE_TOKENIZER)
    if init_from_hf is not None and (init_from_hf / TOKENIZER_FILE).is_file():
        return load_run_tokenizer(init_from_hf)
    return load_run_tokenizer(BYTE_TOKENIZER)


def _dataset(directory: Path, tokenizer: RunTokenizer, sequence_length: int) -> TrainingData:
    index = read_index(directory)
    made_with = index.tokenizer.get("sha256")
    if made_with != tokenizer.sha256:
        made_name = index.tokenizer.get("name", BYTE_TOKENIZER)
        raise DataError(f"dataset {directory} was tokenized with {made_name} but this run's "
                        f"tokenizer is {tokenizer.describe()}; train with the dataset's tokenizer "
                        "(drop --tokenizer) or prepare the data again with this one")
    window = sequence_length + 1
    validation = index.validation_tokens
    if validation < window or index.num_tokens - validation < window:
        raise DataError(
            f"dataset {directory} holds {index.num_tokens:,} tokens, {validation:,} of them for "
            f"validation: each split needs at least one window of {window} tokens (--seq-len "
            f"{sequence_length}); prepare more text, a larger --validation-fraction, or use a "
            "smaller --seq-len")
    shards = TokenShards(index)
    split = index.num_tokens - validation
    return TrainingData(
        train=shards.slice(0, split), validation=shards.slice(split, index.num_tokens),
        tokenizer=tokenizer, source=str(directory), fingerprint=index.fingerprint,
        num_tokens=index.num_tokens, text_bytes=index.text_bytes,
        description=(f"data: {directory}: {index.num_tokens:,} tokens in {len(index.shards)} "
                     f"shard(s) (memory-mapped, {index.dtype}), {validation:,} held out for "
                     f"validation; tokenizer {tokenizer.describe()}"))


def load_training_data(data: Path | None, tokenizer: RunTokenizer, *, sequence_length: int,
                       max_corpus_bytes: int) -> TrainingData:
    """The run's tokens: a prepared dataset's shards, or raw text encoded with `tokenizer`."""
    if data is not None and is_token_dataset(data):
        return _dataset(data, tokenizer, sequence_length)
    corpus = load_corpus(data, sequence_length=sequence_length, max_bytes=max_corpus_bytes,
                         tokenizer=None if tokenizer.is_bytes else tokenizer.tokenizer,
                         eos_token_id=tokenizer.eos_token_id)
    skipped = corpus.skipped_files
    shown = "" if not skipped else (
        f"; skipped {len(skipped)} binary file(s): {', '.join(skipped[:3])}"
        f"{' ...' if len(skipped) > 3 else ''}")
    tokens = "" if tokenizer.is_bytes else f" = {corpus.num_tokens:,} tokens"
    description = (f"data: {corpus.source}: {corpus.num_bytes:,} bytes{tokens} from "
                   f"{corpus.num_files} file(s), {num_tokens(corpus.validation):,} "
                   f"{'bytes' if tokenizer.is_bytes else 'tokens'} held out for validation"
                   f"{shown}; tokenizer {tokenizer.describe()}")
    return TrainingData(train=corpus.train, validation=corpus.validation, tokenizer=tokenizer,
                        source=corpus.source, fingerprint=corpus.fingerprint,
                        num_tokens=corpus.num_tokens, text_bytes=corpus.num_bytes,
                        description=description)
