"""The README's walk-through on your own text, step by step: prepare-data with a real tokenizer,
train from a config file, resume exactly, generate with the same tokenizer; and fine-tuning a
Hugging Face model with its own tokenizer."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from protoformer.cli import main
from tests.train.tokenizer_kit import CODE, PROSE, build_tokenizer, write_text_folder

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                reason="needs the tokenizers package")
README = Path(__file__).resolve().parents[2] / "README.md"
SMALL = ["--batch-size", "4", "--seq-len", "32", "--device", "cpu", "--log-every", "2"]


def _history(run: Path, step: int) -> list[list[float]]:
    state = json.loads((run / "checkpoints" / f"step_{step:06d}" / "state.json").read_text())
    history: list[list[float]] = state["history"]["train"]
    return history


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1 and 2 of the walk-through: a dataset and a run of 4 of the config's 6 steps."""
    root = tmp_path_factory.mktemp("walk")
    tokenizer = build_tokenizer(root / "tokenizer.json")
    write_text_folder(root / "my_text")
    assert main(["prepare-data", str(root / "my_text"), "--tokenizer", str(tokenizer),
                 "--out", str(root / "data")]) == 0
    (root / "run.toml").write_text(
        f'data = "{root / "data"}"\nout = "{root / "run"}"\npreset = "tiny"\nsteps = 6\n'
        'batch-size = 4\nseq-len = 32\nlr = 3e-3\nlr-decay-style = "WSD"\nmin-lr = 3e-4\n'
        'weight-decay = 0.1\nclip-grad = 1.0\ndevice = "cpu"\nsave-every = 2\nlog-every = 2\n')
    assert main(["train", "--config", str(root / "run.toml"), "--steps", "4", "--no-sample"]) == 0
    return root


def test_the_readme_walks_through_these_commands() -> None:
    text = README.read_text()
    for command in ("protoformer prepare-data my_text/ --tokenizer ./tokenizer.json --out data/my_text",
                    "protoformer train --config run.toml --steps 100",
                    "protoformer train --config run.toml --resume",
                    "protoformer generate --checkpoint runs/my-text"):
        assert command in text, command


def test_step_1_and_2_train_with_the_dataset_and_its_tokenizer(walkthrough: Path) -> None:
    run = walkthrough / "run"
    state = json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())
    tokenizer = walkthrough / "tokenizer.json"
    copy = run / "checkpoints" / "step_000004" / "tokenizer.json"
    assert copy.read_bytes() == tokenizer.read_bytes()  # the tokenizer travels with the run
    assert state["files"]["tokenizer.json"]["bytes"] == tokenizer.stat().st_size
    assert state["model"]["vocab_size"] == 384  # 320 tokens, padded to a multiple of 128
    assert state["train_options"]["lr_decay_style"] == "WSD"
    assert state["train_options"]["steps"] == 4  # the command line won over the file's 6
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [2, 4]
    assert {"lr", "grad_norm", "tokens_per_second", "mfu", "memory_gib"} <= set(lines[0])
    assert "steps = 4" in (run / "config.toml").read_text()


def test_step_3_resume_continues_exactly(walkthrough: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(walkthrough / "run", run)
    config = walkthrough / "run.toml"
    assert main(["train", "--config", str(config), "--out", str(run), "--resume",
                 "--no-sample"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # The same 6 steps uninterrupted (same schedule: the file's 6 steps) give the same losses.
    straight = tmp_path / "straight"
    assert main(["train", "--config", str(config), "--out", str(straight), "--no-sample"]) == 0
    partial = tmp_path / "partial"
    assert main(["train", "--config", str(config), "--out", str(partial), "--no-sample",
                 "--steps", "6", "--save-every", "2"]) == 0
    shutil.rmtree(partial / "checkpoints" / "step_000006")
    shutil.rmtree(partial / "checkpoints" / "step_000004")
    (partial / "checkpoints" / "latest").write_text("step_000002\n")
    assert main(["train", "--config", str(config), "--out", str(partial), "--resume",
                 "--no-sample"]) == 0
    assert _history(partial, 6) == _history(straight, 6)
    metrics = [json.loads(line)["step"] for line in
               (partial / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert metrics == [2, 4, 6]  # the resumed run replaced the lines after its checkpoint


def test_step_4_generate_decodes_with_the_runs_tokenizer(
        walkthrough: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from tokenizers import Tokenizer

    from protoformer.cli.generate import load_model
    from protoformer.generation import generate

    prompt = "def greet"
    assert main(["generate", "--checkpoint", str(walkthrough / "run"), "--prompt", prompt,
                 "--max-new-tokens", "8", "--greedy", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    reference = Tokenizer.from_file(str(walkthrough / "tokenizer.json"))
    model, _ = load_model(walkthrough / "run", device="cpu")
    with torch.no_grad():
        ids = generate(model, reference.encode(prompt).ids, 8, greedy=True,
                       stop_token_ids=(reference.token_to_id("<|endoftext|>"),))
    assert out == prompt + reference.decode(ids) + "\n"


def test_raw_text_with_a_tokenizer_and_an_occupied_out(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = build_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "text.txt").write_text((CODE + PROSE) * 20)
    argv = ["train", "--data", str(tmp_path / "text.txt"), "--tokenizer", str(tokenizer),
            "--out", str(tmp_path / "run"), "--steps", "1", "--no-sample", *SMALL]
    assert main(argv) == 0
    assert "tokens from 1 file(s)" in capsys.readouterr().out
    assert main(argv) == 1  # a second new run into the same --out
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and err.count("\n") == 1
    assert main([*argv, "--overwrite"]) == 0
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--steps", "1"]) == 1
    assert "is a file" in capsys.readouterr().err


def test_a_dataset_made_with_another_tokenizer_is_refused(
        walkthrough: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(walkthrough / "data"), "--tokenizer", "bytes",
                 "--out", str(tmp_path / "run"), "--steps", "1", *SMALL]) == 1
    assert "was tokenized with" in capsys.readouterr().err
