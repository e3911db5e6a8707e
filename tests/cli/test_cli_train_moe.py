"""`protoformer train --preset tiny-moe`: trains, shows the aux loss, checkpoints and resumes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protoformer.cli import main


def test_tiny_moe_trains_with_the_aux_loss_in_the_progress_line(
        tmp_path: Path, corpus_file: Path, small_train: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "tiny-moe", "--out", str(tmp_path), "--data",
                 str(corpus_file), "--no-sample", *small_train]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"step \d/4  loss \d+\.\d{4}  aux (\d+\.\d{4})  lr", out)
    assert len(lines) == 2 and all(float(value) > 0 for value in lines)
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", "6", "--no-sample"]) == 0
    assert re.search(r"step 6/6  loss \d+\.\d{4}  aux \d+\.\d{4}", capsys.readouterr().out)
