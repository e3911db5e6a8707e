"""Text <-> token ids for Hugging Face checkpoints, through the `tokenizers` library's tokenizer.json.

What the command line and the data preparation need: encode text (with the special tokens the
tokenizer adds, such as Llama's BOS, or without), encode many texts at once (in `tokenizers`'
threads), decode ids, and stream text as tokens arrive. `tokenizers` ships with transformers
(and with `pip install protoformer[tokenizers]`); it is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

__all__ = ["TOKENIZER_FILE", "HFTokenizer", "StreamDecoder", "TextTokenizer", "load_tokenizer",
           "load_tokenizer_file"]

TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer(Protocol):
    """Encodes text to token ids and back."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _Encoding(Protocol):
    @property
    def ids(self) -> list[int]: ...


class _RawTokenizer(Protocol):
    """The part of `tokenizers.Tokenizer` used here."""

    def encode(self, sequence: str, /) -> _Encoding: ...

    def encode_batch(self, input: list[str], /, is_pretokenized: bool = False,
                     add_special_tokens: bool = True) -> list[_Encoding]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def get_vocab_size(self, with_added_tokens: bool = True) -> int: ...

    def token_to_id(self, token: str) -> int | None: ...


@dataclass(frozen=True)
class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a checkpoint's tokenizer.json."""

    raw: _RawTokenizer
    path: Path

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens the tokenizer's post-processor adds."""
        return list(self.raw.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.raw.decode(list(ids), skip_special_tokens=True)

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
        """Token ids of each of `texts` (encoded in parallel by `tokenizers`' threads)."""
        return [list(encoding.ids)
                for encoding in self.raw.encode_batch(texts, add_special_tokens=add_special_tokens)]

    @property
    def vocab_size(self) -> int:
        """Token ids are below this (added tokens included)."""
        return self.raw.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of the token spelled `token` (e.g. "</s>"), None when there is none."""
        return self.raw.token_to_id(token)


def load_tokenizer_file(path: str | Path) -> HFTokenizer:
    """The tokenizer in the tokenizer.json file `path` (a `tokenizers` serialisation).

    Raises `ImportError` naming the package when `tokenizers` is missing, `ValueError` when the
    file cannot be read as a tokenizer.
    """
    path = Path(path)
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise ImportError(f"{path} needs the 'tokenizers' package to be read; install it with "
                          "`pip install tokenizers` (it comes with `pip install "
                          "protoformer[tokenizers]`)") from error
    try:
        raw = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist") from error
        raise ValueError(f"{path}: not a tokenizers tokenizer.json "
                         f"({' '.join(str(error).split())[:200]})") from error
    return HFTokenizer(cast(_RawTokenizer, raw), path)


def load_tokenizer(directory: str | Path) -> HFTokenizer | None:
    """The tokenizer in `directory/tokenizer.json`, or None when the checkpoint has none.

    Raises `ImportError` naming the package when the file exists but `tokenizers` is missing.
    """
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return None
    return load_tokenizer_file(path)


@dataclass
class StreamDecoder:
    """Turns tokens, one at a time, into the text they add (for printing as they are generated).

    Decoding token by token breaks characters that span tokens (byte-level BPE), so the whole
    sequence is decoded each time and only the new, complete part is returned; text ending in
    an incomplete character (U+FFFD) is held back until the next token completes it.
    """

    tokenizer: TextTokenizer
    ids: list[int] = field(default_factory=lambda: [])
    emitted: str = ""

    def push(self, token: int) -> str:
        """Add `token`; return the text it completes (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    def flush(self) -> str:
        """The text still held back (at the end of generation)."""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
