"""One clear line for the smaller hostile inputs of issue 17: an impossible model size for
this machine, seeds and temperatures out of range, a resumed run whose --steps changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from protoformer.cli import main

TRAIN = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "100",
         "--save-every", "100", "--log-every", "1", "--device", "cpu", "--no-sample"]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_training_a_preset_too_large_for_the_machine_is_refused_before_allocating(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Weights, gradients (fp32) and AdamW's two moments: 16 bytes per parameter, ~1.1 TB
    # for llama3-70b; no machine running these tests has that much free memory.
    err = _one_line_error(capsys, ["train", "--preset", "llama3-70b", "--out", str(tmp_path),
                                   "--seq-len", "16", "--device", "cpu"])
    assert "training preset 'llama3-70b' needs about 70.6 B parameters" in err, err
    assert "with gradients and AdamW state" in err and "cpu has" in err, err


def test_a_seed_out_of_range_is_one_line(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path, corpus_file: Path) -> None:
    err = _one_line_error(capsys, ["train", "--seed", str(2**70), "--out", str(tmp_path),
                                   "--data", str(corpus_file), *TRAIN])
    assert "seed=1180591620717411303424: must be an integer from 0 to 2**62" in err, err
    err = _one_line_error(capsys, ["train", "--seed", "-1", "--out", str(tmp_path),
                                   "--data", str(corpus_file), *TRAIN])
    assert "seed=-1: must be an integer from 0 to 2**62" in err, err


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_a_non_finite_temperature_is_refused(capsys: pytest.CaptureFixture[str],
                                             trained_run: Path, value: str) -> None:
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(trained_run), "--prompt",
                                   "def", "--temperature", value, "--max-new-tokens", "2"])
    assert "temperature=" in err and "must be a finite number >= 0" in err, err


def test_a_generation_seed_out_of_range_is_one_line(capsys: pytest.CaptureFixture[str],
                                                    trained_run: Path) -> None:
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(trained_run), "--prompt",
                                   "def", "--seed", str(2**70), "--max-new-tokens", "2"])
    assert "seed=1180591620717411303424: must be an integer from 0 to 2**62" in err, err


def test_resuming_with_other_steps_says_the_schedule_changes(
        capsys: pytest.CaptureFixture[str], trained_run: Path, tmp_path: Path,
        corpus_file: Path, small_train: list[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    flags = [flag for flag in small_train]
    flags[flags.index("--steps") + 1] = "6"  # the run was trained for 4
    assert main(["train", "--resume", "--out", str(run), "--data", str(corpus_file),
                 "--no-sample", *flags]) == 0
    out = capsys.readouterr().out
    assert "note: --steps 6 differs from the 4 this run was started with" in out, out
    assert "from step 4 on the learning rate differs" in out, out
