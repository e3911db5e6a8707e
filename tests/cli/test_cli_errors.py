"""Bad input gives one line on stderr, `protoformer: error: ...`, and a non-zero exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protoformer.cli import main


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.startswith("protoformer: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_unknown_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _one_line_error(capsys, ["inspect", "gpt-17"], "unknown preset 'gpt-17'")
    _one_line_error(capsys, ["train", "--preset", "gpt-17", "--out", str(tmp_path)],
                    "unknown preset 'gpt-17'")


def test_batch_size_flags_that_disagree(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    _one_line_error(capsys, ["train", "--batch-size", "8", "--global-batch-size", "16",
                             "--out", str(tmp_path)], "name the same thing")
    _one_line_error(capsys, ["train", "--global-batch-size", "8", "--micro-batch-size", "3",
                             "--steps", "1", "--seq-len", "16",
                             "--out", str(tmp_path)], "--micro-batch-size 3 must divide")


def test_unreadable_data_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus.txt"
    _one_line_error(capsys, ["train", "--data", str(missing), "--out", str(tmp_path)],
                    "does not exist")


def test_missing_checkpoint_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "a"],
                    "does not exist")
    _one_line_error(capsys, ["generate", "--checkpoint", str(tmp_path), "--prompt", "a"],
                    "holds no checkpoint")


def test_corrupt_checkpoint(capsys: pytest.CaptureFixture[str], trained_run: Path,
                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(capsys, ["generate", "--checkpoint", str(run), "--prompt", "a"],
                    "model.safetensors")


def test_prompt_bytes_outside_the_vocabulary(capsys: pytest.CaptureFixture[str],
                                             trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state_path = run / "checkpoints" / "step_000004" / "state.json"
    state = json.loads(state_path.read_text())
    state["model"]["vocab_size"] = 128  # as if trained with a 7-bit vocabulary
    state_path.write_text(json.dumps(state))
    _one_line_error(capsys, ["generate", "--checkpoint", str(run), "--prompt", "caf\u00e9"],
                    "outside the model's vocabulary")


def test_empty_prompt_and_bad_sampling(capsys: pytest.CaptureFixture[str], trained_run: Path) -> None:
    _one_line_error(capsys, ["generate", "--checkpoint", str(trained_run), "--prompt", ""],
                    "--prompt is empty")
    _one_line_error(capsys, ["generate", "--checkpoint", str(trained_run), "--prompt", "a",
                             "--top-p", "2"], "top_p")


def test_resume_without_a_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _one_line_error(capsys, ["train", "--resume", "--out", str(tmp_path)], "no checkpoint")


def test_missing_recipe_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _one_line_error(capsys, ["check", str(tmp_path / "nope.py")], "nope.py")


def test_errors_are_one_line_from_the_console_entry_point(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "protoformer.cli", "inspect", "nope"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("protoformer: error: unknown preset 'nope'")
    assert result.stderr.count("\n") == 1


def test_a_misspelt_preset_lists_both_kinds_and_the_closest(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "t5-bas"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 't5-base'?" in err
    assert all(name in err for name in ("tiny", "llama3-8b", "t5-small", "t5-v1_1-xl"))


@pytest.mark.parametrize(("source", "needle"), [
    ("def spec(backend, config)\n    return 1\n", "recipe.py:1: syntax error"),
    ("from protoformer.transformer.layer import TransformerLayerSubmodules\n"
     "def spec(backend, config):\n    return TransformerLayerSubmodules()\n",
     "raised TypeError: TransformerLayerSubmodules.__init__() missing 4 required"),
    ("import no_such_module_xyz\n", "raised ModuleNotFoundError"),
    ("def spec(backend, config):\n    return undefined\n", "recipe.py:3)"),
])
def test_a_broken_recipe_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     source: str, needle: str) -> None:
    recipe = tmp_path / "recipe.py"
    recipe.write_text(source.replace("return undefined", "x = 1\n    return undefined"))
    _one_line_error(capsys, ["check", f"{recipe}:spec"], needle)
