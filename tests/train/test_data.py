"""The byte corpus, its train/validation split and the batch samplers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protoformer.train.data import (
    BatchSampler,
    DataError,
    load_corpus,
    stdlib_source_files,
    validation_batches,
)


def _counting_tokens(n: int) -> torch.Tensor:
    return (torch.arange(n) % 256).to(torch.uint8)  # each byte is the previous one plus 1


def _is_window(row: torch.Tensor) -> bool:
    # In the counting stream, a contiguous window steps by exactly 1 (mod 256) everywhere.
    return bool(((row[1:] - row[:-1]) % 256 == 1).all())


def test_default_corpus_is_the_stdlib_source_deterministic_and_capped() -> None:
    files = stdlib_source_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    first = load_corpus(None, sequence_length=64, max_bytes=100_000)
    second = load_corpus(None, sequence_length=64, max_bytes=100_000)
    assert first.num_bytes == 100_000
    assert torch.equal(first.train, second.train) and torch.equal(first.validation, second.validation)
    expected = b"".join(f.read_bytes() for f in files[:40])[:100_000]  # first files, in order
    joined = torch.cat([first.train, first.validation]).numpy().tobytes()
    assert joined == expected
    assert first.validation.numel() == 5_000  # the last 5%


def test_a_text_file_splits_off_its_last_bytes_for_validation(tmp_path: Path) -> None:
    text = bytes(range(1, 256)) * 40  # no NUL: a NUL byte marks a binary file
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    corpus = load_corpus(path, sequence_length=16)
    assert corpus.train.numpy().tobytes() == text[: len(text) - len(text) // 20]
    assert corpus.validation.numpy().tobytes() == text[len(text) - len(text) // 20:]


def test_a_directory_is_read_in_path_order_skipping_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"B" * 100)
    (tmp_path / "a.txt").write_bytes(b"A" * 100)
    (tmp_path / ".hidden").write_bytes(b"H" * 100)
    corpus = load_corpus(tmp_path, sequence_length=8)
    joined = torch.cat([corpus.train, corpus.validation]).numpy().tobytes()
    assert joined == b"A" * 100 + b"B" * 100
    assert corpus.num_files == 2


def test_binary_files_in_a_directory_are_skipped_and_named(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"A" * 100)
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"P" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes("B\u00e9".encode() * 50)  # non-ASCII text stays
    corpus = load_corpus(tmp_path, sequence_length=8)
    joined = torch.cat([corpus.train, corpus.validation]).numpy().tobytes()
    assert joined == b"A" * 100 + "B\u00e9".encode() * 50
    assert corpus.num_files == 2 and corpus.skipped_files == ("logo.png",)
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "x.bin").write_bytes(bytes(300))
    with pytest.raises(DataError, match="only binary files"):
        load_corpus(only_binary, sequence_length=8)


def test_the_fingerprint_follows_the_bytes(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"abcdefgh" * 20)
    first = load_corpus(path, sequence_length=8)
    assert first.fingerprint == hashlib.sha256(b"abcdefgh" * 20).hexdigest()
    path.write_bytes(b"abcdefgh" * 19 + b"abcdefgX")
    assert load_corpus(path, sequence_length=8).fingerprint != first.fingerprint


def test_validation_holds_at_least_one_window(tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_bytes(b"x" * 100)
    corpus = load_corpus(path, sequence_length=20)
    assert corpus.validation.numel() == 21 and corpus.train.numel() == 79


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b"", "empty"),
    (b"abc", "too few for sequence length"),
])
def test_unusable_data_raises_a_clear_error(tmp_path: Path, content: bytes | None,
                                            message: str) -> None:
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(path, sequence_length=16)


def test_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no files"):
        load_corpus(tmp_path, sequence_length=16)


def test_sampler_draws_contiguous_windows_reproducibly() -> None:
    tokens = _counting_tokens(5000)
    a = BatchSampler(tokens, 4, 32, seed=7)
    b = BatchSampler(tokens, 4, 32, seed=7)
    for _ in range(5):
        batch = a.next_batch()
        assert batch.shape == (4, 33) and batch.dtype == torch.long
        assert all(_is_window(row) for row in batch)
        assert torch.equal(batch, b.next_batch())
    assert not torch.equal(BatchSampler(tokens, 4, 32, seed=8).next_batch(),
                           BatchSampler(tokens, 4, 32, seed=7).next_batch())


def test_sampler_state_restores_the_position() -> None:
    tokens = _counting_tokens(5000)
    sampler = BatchSampler(tokens, 3, 16, seed=1)
    for _ in range(4):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    restored = BatchSampler(tokens, 3, 16, seed=999)
    restored.load_state_dict(state)
    assert restored.batches_drawn == 4
    assert all(torch.equal(e, restored.next_batch()) for e in expected)


def test_data_parallel_ranks_split_the_global_batch() -> None:
    tokens = _counting_tokens(5000)
    whole = BatchSampler(tokens, 8, 16, seed=3)
    ranks = [BatchSampler(tokens, 4, 16, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(whole.next_batch(), torch.cat([r.next_batch() for r in ranks]))


def test_validation_batches_are_fixed_and_cover_the_split() -> None:
    tokens = _counting_tokens(1000)
    batches = validation_batches(tokens, 2, 15, 3)
    assert len(batches) == 3 and all(b.shape == (2, 16) for b in batches)
    assert all(_is_window(row) for b in batches for row in b)
    assert batches[0][0, 0] == 0 and batches[-1][-1, -1] == 999 % 256  # first and last window
    again = validation_batches(tokens, 2, 15, 3)
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))
    shards = [validation_batches(tokens, 2, 15, 2, dp_rank=r, dp_size=2) for r in range(2)]
    assert all(len(s) == 2 for s in shards)


def test_raw_text_past_the_budget_is_refused_not_cut_short(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a" * 600)
    (tmp_path / "b.txt").write_bytes(b"b" * 600)
    assert load_corpus(tmp_path, sequence_length=8, max_bytes=1200).num_bytes == 1200  # fits
    for budget in (1199, 600, 300):  # cut inside b.txt, before b.txt, inside a.txt
        with pytest.raises(DataError, match=r"more than .* prepare-data"):
            load_corpus(tmp_path, sequence_length=8, max_bytes=budget)


def test_a_single_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01" * 500)
    with pytest.raises(DataError, match="is binary"):
        load_corpus(path, sequence_length=8)


def test_a_tokenizer_encodes_each_file_as_a_document(tmp_path: Path) -> None:
    class Doubling:
        def encode_batch(self, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
            return [[ord(c) * 2 for c in text] for text in texts]

    (tmp_path / "a.txt").write_text("ab" * 20)
    (tmp_path / "b.txt").write_text("cd" * 20)
    corpus = load_corpus(tmp_path, sequence_length=8, tokenizer=Doubling(), eos_token_id=1)
    ids = torch.cat([corpus.train, corpus.validation]).tolist()
    assert ids == [ord(c) * 2 for c in "ab" * 20] + [1] + [ord(c) * 2 for c in "cd" * 20] + [1]
    assert corpus.num_bytes == 80 and corpus.num_tokens == 82
