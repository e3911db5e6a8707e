"""prepare-data's token shards: what they hold, how they stream, and how damage is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protoformer.cli import main
from protoformer.train.data import BatchSampler, DataError
from protoformer.train.prepare_data import prepare_data
from protoformer.train.token_shards import (
    ShardWriter,
    TokenShards,
    read_index,
    token_dtype,
)
from protoformer.train.tokenizer import load_run_tokenizer
from tests.train.tokenizer_kit import CODE, PROSE, build_tokenizer, write_text_folder


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_a_folder_is_tokenized_file_by_file_with_the_tokenizer(tmp_path: Path,
                                                               tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    folder = write_text_folder(tmp_path / "txt")
    prepared = prepare_data(folder, tmp_path / "ds", load_run_tokenizer(tokenizer_file),
                            shard_tokens=500)
    reference = Tokenizer.from_file(str(tokenizer_file))  # independent of protoformer's wrapper
    eos = reference.token_to_id("<|endoftext|>")
    # code.py, then prose.txt, each followed by the end-of-text token
    expected = [*reference.encode(CODE * 40).ids, eos, *reference.encode(PROSE * 40).ids, eos]
    index = prepared.index
    assert index.num_tokens == len(expected) and index.num_documents == 2
    assert index.dtype == "uint16" and len(index.shards) == -(-len(expected) // 500)
    assert TokenShards(index).read(0, index.num_tokens).tolist() == expected
    assert index.validation_tokens == round(len(expected) * 0.05)
    assert index.text_bytes == len((CODE * 40 + PROSE * 40).encode())
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert prepared.skipped_files == ["image.bin"]
    raw = np.fromfile(tmp_path / "ds" / "shard_00000.bin", dtype="<u2")  # nanoGPT-style .bin
    assert raw.tolist() == expected[:500]


def test_windows_cross_shard_boundaries_and_resume_draws_the_same_batches(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, vocab_size=1000, shard_tokens=7)
    stream = np.arange(100, dtype=np.int64) % 1000
    writer.add_document(stream[:40])
    writer.add_document(stream[40:])
    writer.write_index(text_bytes=100, validation_tokens=10, tokenizer={}, sources=[])
    shards = TokenShards(read_index(tmp_path))
    assert len(shards.index.shards) == 15
    for start in range(0, 90):
        assert shards.read(start, 11).tolist() == list(range(start, start + 11))
    assert shards.slice(90, 100).read(0, 10).tolist() == list(range(90, 100))
    sampler = BatchSampler(shards.slice(0, 90), 3, 8, seed=5)
    for _ in range(3):
        batch = sampler.next_batch()
        assert bool(((batch[:, 1:] - batch[:, :-1]) == 1).all())  # contiguous windows
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(2)]
    restored = BatchSampler(shards.slice(0, 90), 3, 8, seed=0)
    restored.load_state_dict(state)
    assert all(torch.equal(e, restored.next_batch()) for e in expected)


def test_a_vocabulary_of_65536_or_more_ids_is_stored_as_uint32(tmp_path: Path) -> None:
    assert token_dtype(65535) == "uint16" and token_dtype(65536) == "uint32"
    writer = ShardWriter(tmp_path, vocab_size=100_000, shard_tokens=1000)
    writer.add_document(np.array([5, 70_000, 99_999], dtype=np.int64))
    writer.write_index(text_bytes=3, validation_tokens=1, tokenizer={}, sources=[])
    assert np.fromfile(tmp_path / "shard_00000.bin", dtype="<u4").tolist() == [5, 70_000, 99_999]
    assert TokenShards(read_index(tmp_path)).read(0, 3).tolist() == [5, 70_000, 99_999]
    with pytest.raises(DataError, match="outside the tokenizer's vocabulary"):
        writer.add_document(np.array([100_000], dtype=np.int64))


def test_a_shard_larger_than_the_old_8_mib_cap_streams_to_its_last_token(tmp_path: Path) -> None:
    body = (CODE + PROSE) * (9 * 1024 * 1024 // len(CODE + PROSE) + 1)  # > 9 MiB of text
    (tmp_path / "big.txt").write_text(body)
    prepared = prepare_data(tmp_path / "big.txt", tmp_path / "ds", load_run_tokenizer("bytes"))
    index = prepared.index
    assert index.num_tokens == len(body.encode()) > 9 * 1024 * 1024
    assert (tmp_path / "ds" / "shard_00000.bin").stat().st_size > 8 * 1024 * 1024
    tail = TokenShards(index).read(index.num_tokens - 300, 300)
    assert bytes(tail.astype(np.uint8).tolist()) == body.encode()[-300:]


def _dataset(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_text(CODE * 50)
    out = tmp_path / "ds"
    prepare_data(tmp_path / "a.txt", out, load_run_tokenizer("bytes"), shard_tokens=1000)
    return out


def test_a_truncated_shard_is_refused_naming_it(tmp_path: Path) -> None:
    out = _dataset(tmp_path)
    shard = out / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard_00001\.bin: 1998 bytes.*truncated"):
        read_index(out)


def test_jsonl_documents_come_from_the_text_key(tmp_path: Path) -> None:
    lines = [json.dumps({"content": text, "id": i}) for i, text in enumerate(["ab", "cde"])]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    prepared = prepare_data(tmp_path / "docs.jsonl", tmp_path / "ds",
                            load_run_tokenizer("bytes"), text_key="content")
    assert TokenShards(prepared.index).read(0, 5).tolist() == list(b"abcde")
    assert prepared.index.num_documents == 2
    with pytest.raises(DataError, match=r"no string field 'text'.*--text-key"):
        prepare_data(tmp_path / "docs.jsonl", tmp_path / "ds2", load_run_tokenizer("bytes"))


def test_parquet_without_pyarrow_is_refused_clearly(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenizers")
    try:
        import pyarrow  # noqa: F401  # pyright: ignore[reportMissingImports]
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    assert main(["prepare-data", str(tmp_path / "data.parquet"), "--out",
                 str(tmp_path / "ds")]) == 1
    assert "needs pyarrow" in capsys.readouterr().err


def test_prepare_data_refuses_an_occupied_out_and_a_file(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = _dataset(tmp_path)
    source = str(tmp_path / "a.txt")
    assert main(["prepare-data", source, "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["prepare-data", source, "--out", str(out), "--overwrite"]) == 0
    assert main(["prepare-data", source, "--out", source]) == 1
    assert "is a file" in capsys.readouterr().err
def test_a_corrupt_shard_is_refused_in_one_line_by_train(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _dataset(tmp_path)
    shard = out / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--device", "cpu", "--no-sample"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard_00000.bin" in err and "sha256" in err


