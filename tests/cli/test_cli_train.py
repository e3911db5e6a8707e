"""`protoformer train` and `protoformer generate` end to end, in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from protoformer.cli import main


def test_train_reports_losses_checkpoint_curve_and_a_sample(
        tmp_path: Path, corpus_file: Path, small_train: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path), "--data", str(corpus_file), *small_train]) == 0
    out = capsys.readouterr().out
    assert "step 2/4  loss" in out and "step 4/4  loss" in out  # plain lines: not a terminal
    assert f"checkpoint: {tmp_path / 'checkpoints' / 'step_000004'}" in out
    assert f"loss curve: {tmp_path / 'loss_curve.png'}" in out
    assert (tmp_path / "loss_curve.png").is_file()
    assert "sample (temperature 0.8" in out and "\ndef " in out


def test_resume_continues_with_the_saved_options(trained_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_000004" in out
    assert "step 6/6" in out and "2 steps in" in out  # batch size etc. came from the checkpoint
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000006"


def test_generate_streams_the_prompt_and_its_continuation(trained_run: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--checkpoint", str(trained_run), "--prompt", "def ",
            "--max-new-tokens", "12", "--greedy"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and first.endswith("\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic


def test_generate_accepts_a_step_directory_and_sampling_options(
        trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step_dir = trained_run / "checkpoints" / "step_000002"
    args = ["generate", "--checkpoint", str(step_dir), "--prompt", "x", "--max-new-tokens", "5",
            "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("x")


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "protoformer.cli", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("train", "generate", "inspect", "check"))


def test_generate_with_the_static_graph_step_prints_the_same_text(
        trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for mode in ("on", "off"):
        args = ["generate", "--checkpoint", str(trained_run), "--prompt", "def ", "--greedy",
                "--max-new-tokens", "24", "--cuda-graph", mode]
        assert main(args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("def ")
