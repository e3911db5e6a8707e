"""The tokenizer a run trains and generates with: bytes, or a Hugging Face tokenizer.json.

Bytes (token id = byte value, vocabulary 256) are the embedded default: any text trains
without a tokenizer file. A real tokenizer is a `tokenizers` tokenizer.json, named by
`--tokenizer PATH` (the file, or a directory holding it; nothing is downloaded), taken from a
prepared dataset (`protoformer prepare-data` copies its tokenizer next to the shards) or from
the Hugging Face checkpoint a run starts from. It travels with the run: every checkpoint
holds a copy of the file, recorded with its sha256, so `protoformer generate --checkpoint`
decodes with the tokenizer the model was trained with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protoformer.interop.hf_tokenizer import TOKENIZER_FILE, HFTokenizer, load_tokenizer_file

__all__ = [
    "BYTE_TOKENIZER",
    "BYTE_VOCAB_SIZE",
    "ByteTokenizer",
    "RunTokenizer",
    "file_sha256",
    "load_run_tokenizer",
]

BYTE_VOCAB_SIZE = 256
BYTE_TOKENIZER = "bytes"
"""The `--tokenizer` name of the byte-level tokenizer (the default)."""
_EOS_SPELLINGS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; ids past 255 decode as U+FFFD."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        del add_special_tokens  # bytes have none
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(bytes([i]) if 0 <= i < BYTE_VOCAB_SIZE else "\ufffd".encode()
                        for i in ids).decode("utf-8", errors="replace")


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunTokenizer:
    """A run's tokenizer: what it is called, its vocabulary and where its file is."""

    name: str  # "bytes", or the tokenizer.json it was loaded from
    tokenizer: ByteTokenizer | HFTokenizer
    file: Path | None  # the tokenizer.json (None for bytes)
    sha256: str | None  # of `file`
    eos_token_id: int | None  # appended after each document by prepare-data, when known

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def is_bytes(self) -> bool:
        return self.file is None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (with the tokenizer's special tokens, e.g. a BOS)."""
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def describe(self) -> str:
        if self.file is None:
            return f"bytes ({BYTE_VOCAB_SIZE} token ids)"
        return f"{self.file} ({self.vocab_size:,} token ids)"

    def to_json(self) -> dict[str, str | int | None]:
        """What a checkpoint or a dataset index records about the tokenizer."""
        return {"name": self.name, "file": None if self.file is None else TOKENIZER_FILE,
                "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eos_token_id": self.eos_token_id}


def _eos_token_id(tokenizer: HFTokenizer) -> int | None:
    for spelling in _EOS_SPELLINGS:
        token = tokenizer.token_id(spelling)
        if token is not None:
            return token
    return None


def load_run_tokenizer(name: str | Path | None) -> RunTokenizer:
    """The tokenizer `name` names: None or "bytes" for bytes, else a tokenizer.json file or a
    directory holding one (a Hugging Face checkpoint, a prepared dataset, a checkpoint step).

    A name that is neither raises `ValueError` saying what to give; nothing is downloaded.
    """
    if name is None or str(name) == BYTE_TOKENIZER:
        return RunTokenizer(name=BYTE_TOKENIZER, tokenizer=ByteTokenizer(), file=None,
                            sha256=None, eos_token_id=None)
    path = Path(name)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise ValueError(f"tokenizer directory {str(path)!r} holds no {TOKENIZER_FILE}; give "
                             f"a tokenizer.json file or a directory with one (e.g. a Hugging Face "
                             f"checkpoint), or '{BYTE_TOKENIZER}'")
        path = path / TOKENIZER_FILE
    elif not path.is_file():
        raise ValueError(f"tokenizer {str(name)!r} is neither a tokenizer.json file nor a "
                         f"directory holding one (names are local paths; nothing is "
                         f"downloaded), nor '{BYTE_TOKENIZER}'")
    tokenizer = load_tokenizer_file(path)
    return RunTokenizer(name=str(path), tokenizer=tokenizer, file=path,
                        sha256=file_sha256(path), eos_token_id=_eos_token_id(tokenizer))
