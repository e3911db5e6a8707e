"""The run's tokenizer: bytes by default, a tokenizer.json by path, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoformer.train.tokenizer import file_sha256, load_run_tokenizer
from tests.train.tokenizer_kit import CODE, build_tokenizer


def test_bytes_is_the_default_and_round_trips_utf8() -> None:
    for name in (None, "bytes"):
        tokenizer = load_run_tokenizer(name)
        assert tokenizer.is_bytes and tokenizer.vocab_size == 256
        assert tokenizer.encode("h\u00e9") == [104, 0xC3, 0xA9]
        assert tokenizer.decode([104, 0xC3, 0xA9]) == "h\u00e9"


def test_a_tokenizer_json_loads_by_file_or_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = build_tokenizer(tmp_path / "tokenizer.json")
    reference = Tokenizer.from_file(str(path))
    for name in (path, tmp_path, str(tmp_path)):
        tokenizer = load_run_tokenizer(name)
        assert tokenizer.file == path and tokenizer.sha256 == file_sha256(path)
        assert tokenizer.vocab_size == reference.get_vocab_size()
        assert tokenizer.encode(CODE) == reference.encode(CODE).ids
        assert tokenizer.decode(tokenizer.encode(CODE)) == CODE
        assert tokenizer.eos_token_id == reference.token_to_id("<|endoftext|>")


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root / "missing", "neither a tokenizer.json file nor a directory"),
    (lambda root: root, "holds no tokenizer.json"),
    (lambda root: root / "bad.json", "not a tokenizers tokenizer.json"),
])
def test_a_bad_tokenizer_name_is_one_clear_error(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=message):
        load_run_tokenizer(make(tmp_path))
